"""Networks by name (registry.py): the scratch CNN and InceptionV3, and the offline pretrained weights."""
