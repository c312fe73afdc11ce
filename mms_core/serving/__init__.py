"""Serving: batch prediction on Dask (online server, stream predictor, router: issue 3, to come)."""
