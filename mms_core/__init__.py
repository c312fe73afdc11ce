"""MMS core library: plain Python, no Prefect. Flows and tasks compose these functions."""
