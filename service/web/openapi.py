"""``GET /openapi.json``: the API contract, ``docs/openapi.yaml``, served as JSON."""

from __future__ import annotations

import functools
import json

import falcon
import yaml

from ..config.datafiles import data_file

SPEC_FILE = "docs/openapi.yaml"
# libyaml's loader when PyYAML was built with it: several times faster.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_spec():
    """The OpenAPI document as plain JSON values."""
    return yaml.load(data_file(SPEC_FILE).read_text(encoding="utf-8"), Loader=_Loader)


@functools.cache
def spec_json():
    """The document encoded as JSON, once per process.

    json.dumps also refuses what YAML parses but JSON lacks (a date left
    unquoted), so such a mistake stops the app at creation.
    """
    return json.dumps(load_spec(), ensure_ascii=False).encode()


class OpenAPIResource:
    """Serves the document, encoded once per process."""

    def __init__(self, body=None):
        self._body = spec_json() if body is None else body

    def on_get(self, req, resp):
        resp.data = self._body
        resp.content_type = falcon.MEDIA_JSON
        resp.cache_control = ["no-cache"]
