"""A training run from start to end (main.py): image training (images.py) or a head on cached features
(features.py), with the shared start-up, resume, best-checkpoint rule, checkpoints, tracking and outputs."""
