"""The training loop as plain functions: one epoch (epoch.py), scoring a split (scoring.py), the weight EMA."""
