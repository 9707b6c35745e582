"""What catdog writes to disk for others to read: the run directory (rundir.py) and the model bundle (bundle.py)."""
