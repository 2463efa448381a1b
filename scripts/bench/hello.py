"""A hello-world Falcon app on the service's waitress: the stack's ceiling.

``python -m bench.hello [livecomments serve flags]``. The flags are parsed
into the service's Settings and the server is made by the service's own
``create_server`` (``waitress_options(settings)`` and its channel class), so
threads, connection limit, backlog and every waitress option are the
service's. Only the app differs: no database, no hold, a small JSON body.
"""

from __future__ import annotations

import json
import os
import sys

import falcon

from service.serve.server import create_server

from .server import settings_from_flags

#: About the size of an empty feed page.
BODY = json.dumps({"content_id": 1, "comments": [], "cursor": 0, "poll_after_ms": 0,
                   "reset": False}).encode()


class HelloResource:
    def on_get(self, req, resp):
        resp.data = BODY
        resp.content_type = falcon.MEDIA_JSON
        resp.cache_control = ["no-store"]


def create_app():
    app = falcon.App()
    hello = HelloResource()
    app.add_route("/", hello)
    app.add_route("/healthz", hello)
    return app


def main(argv=None):
    settings = settings_from_flags(sys.argv[1:] if argv is None else argv, os.environ)
    create_server(create_app(), settings).run()


if __name__ == "__main__":
    main()
