"""Serving: waitress guarded for clients that face it directly, and the
``--workers`` processes. Knows nothing of the app.

- ``framing``: HTTP/1.1 request framing checks (the request parser);
- ``channel``: one guarded connection (its deadlines, the close after a
  refusal) and the service's channel, refusing in JSON;
- ``listen``: the listening server and its limits (connections per client
  address, the pass that closes connections out of time);
- ``server``: waitress's options and those limits from the settings, and
  serving until a signal;
- ``workers``: K processes on one port, and their supervisor.
"""
