"""The online server: HTTP routes, auth, the router (pools + replica set + batcher) and its runtime."""
