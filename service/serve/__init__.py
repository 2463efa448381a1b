"""Serving: HTTP/1.1 framing, the guarded connection, the waitress server
and its limits, and ``--workers`` processes. Knows nothing of the app."""
