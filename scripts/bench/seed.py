"""The seed's design, for the dbload baseline: every viewer's poll is a query.

``python -m bench.seed --database-url URL [livecomments serve flags]``: the
service's waitress and Store, and an app with no feeds, no holds and no
pollers: ``GET /contents/{id}/comments?since=N`` answers at once with the
store's changes after N (one query per request), ``POST`` stores a comment.
Its viewers poll once a second, as the seed's clients did.
"""

from __future__ import annotations

import json
import os
import sys

import falcon

from service.db.store import Store
from service.serve.server import create_server

from .server import settings_from_flags


class SeedComments:
    def __init__(self, store):
        self._store = store

    def on_get(self, req, resp, content_id):
        since = req.get_param_as_int("since", default=0)
        changes = self._store.changes_since(int(content_id), since, 50)
        cursor = changes[-1].seq if changes else since
        resp.data = json.dumps({"comments": [c.to_json() for c in changes],
                                "cursor": cursor}).encode()
        resp.content_type = falcon.MEDIA_JSON

    def on_post(self, req, resp, content_id):
        body = json.loads(req.bounded_stream.read())["body"]
        resp.media = self._store.add_comment(int(content_id), 1, body).to_json()
        resp.status = falcon.HTTP_201


class Health:
    def on_get(self, req, resp):
        resp.media = {"status": "ok"}


def main(argv=None):
    settings = settings_from_flags(sys.argv[1:] if argv is None else argv, os.environ)
    store = Store.from_settings(settings)
    app = falcon.App()
    app.add_route("/contents/{content_id}/comments", SeedComments(store))
    app.add_route("/healthz", Health())
    create_server(app, settings).run()


if __name__ == "__main__":
    main()
