"""Prefect tasks: thin wrappers (retries, cache keys, logging) around one mms_core call each."""
