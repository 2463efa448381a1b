"""``GET /openapi.json``: the API contract, ``docs/openapi.yaml``, served as JSON."""

from __future__ import annotations

import json

import falcon
import yaml

from .datafiles import data_file

SPEC_FILE = "docs/openapi.yaml"


def load_spec():
    """The OpenAPI document as plain JSON values."""
    return yaml.safe_load(data_file(SPEC_FILE).read_text(encoding="utf-8"))


class OpenAPIResource:
    """Serves the document, read and encoded once when the app is built."""

    def __init__(self, spec=None):
        # json.dumps also refuses what YAML parses but JSON lacks (a date
        # left unquoted), so such a mistake stops the app at creation.
        self._body = json.dumps(load_spec() if spec is None else spec,
                                ensure_ascii=False).encode()

    def on_get(self, req, resp):
        resp.data = self._body
        resp.content_type = falcon.MEDIA_JSON
        resp.cache_control = ["no-cache"]
