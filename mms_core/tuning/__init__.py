"""Hyperparameter tuning: Optuna studies whose trials are short training runs on Dask."""
