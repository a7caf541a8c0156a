"""Edge: the request path: ASGI adapter, request parsing, pipeline steps, answer writing."""
