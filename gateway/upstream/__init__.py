"""Upstream: the one seam to the modules (HTTP/1.1 client, connection pools, TLS)."""
