"""The machine a process runs on: which precision it computes natively, how glibc keeps freed memory, which GPU a
rank trains on. CPU counts live in data_prep/cpus.py (catdog-prep needs them too)."""
