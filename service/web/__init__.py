"""The HTTP face: Falcon resources, request parsing, SSE, answer formats,
cache headers, tokens, metrics, the API document and the static files."""
