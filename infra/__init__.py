"""How the real components start: the local loopback stack (`mms stack up`), cluster recipes."""
