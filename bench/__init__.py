"""Benchmarks (run as modules, e.g. ``python -m bench.ddp_overhead``)."""
