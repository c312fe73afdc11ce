"""Distributed training strategies on Dask. Each strategy is one module; all share TrainJob."""
