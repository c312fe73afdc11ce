"""Data: ingest (built-in datasets, fsspec URIs), preprocess and shard with a manifest."""
