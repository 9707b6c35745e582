"""Reading shards into batches: the epoch order (order.py), a member index and one read per sample (reader.py),
batches built in DataLoader workers (loader.py), the streams the trainer and the tools read (streams.py), transforms,
the shared-memory batch buffers, and what a worker's death raises (workers.py)."""
