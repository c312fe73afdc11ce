"""The `mms` command line."""
