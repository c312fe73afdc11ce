"""Serving off the request path: batch prediction on Dask, stream brokers and consumers, the
per-worker predictor cache."""
