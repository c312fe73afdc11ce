"""Prefect flows: compose tasks top to bottom, no data logic."""
