"""The browser client and the demo page, served from ``service/static/``.

The files are few and small: they are read once at start, each with an
ETag from its content. Pages name scripts with ``?v=<etag>``, and a
request with the current version may be cached for a year; without it,
clients revalidate (a 304 costs a round trip, not the file).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import falcon

from ..common.errors import ErrorCode
from .parsing import parse_id

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: What a versioned URL may be cached for: its bytes can never change.
IMMUTABLE_MAX_AGE = 365 * 24 * 3600
#: Nothing in the demo page may come from elsewhere or run inline, so a
#: comment body that slipped into the page as HTML could still run nothing.
DEMO_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

_TYPES = {
    ".js": "application/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
}


class StaticFile:
    __slots__ = ("data", "etag", "content_type")

    def __init__(self, data, content_type):
        self.data = data
        self.etag = hashlib.sha256(data).hexdigest()[:16]
        self.content_type = content_type


def load(directory=STATIC_DIR):
    """{name: StaticFile} for the files a browser may fetch; the demo page
    gets its scripts' current versions written into it."""
    files = {
        path.name: StaticFile(path.read_bytes(), _TYPES[path.suffix])
        for path in sorted(directory.iterdir())
        if path.suffix in _TYPES
    }
    demo = files.pop("demo.html")
    html = demo.data
    for name, file in files.items():
        html = html.replace(f"/static/{name}\"".encode(),
                            f"/static/{name}?v={file.etag}\"".encode())
    return files, StaticFile(html, demo.content_type)


class StaticResource:
    """``/static/{name}``: the client script and the demo's own files."""

    def __init__(self, files):
        self._files = files

    def on_get(self, req, resp, name):
        file = self._files.get(name)
        if file is None:
            raise falcon.HTTPNotFound(
                title="Not found", description=f"no static file {name!r}",
                code=ErrorCode.NOT_FOUND,
            )
        resp.etag = file.etag
        if req.get_param("v") == file.etag:
            resp.cache_control = ["public", f"max-age={IMMUTABLE_MAX_AGE}", "immutable"]
        else:
            resp.cache_control = ["no-cache"]
        if req.if_none_match and any(tag == file.etag for tag in req.if_none_match):
            resp.status = falcon.HTTP_304
            return
        resp.content_type = file.content_type
        resp.data = file.data


class DemoResource:
    """``/`` and ``/demo/{content_id}``: a live comment panel for one content."""

    def __init__(self, page):
        self._page = page

    def on_get(self, req, resp, content_id=None):
        if content_id is not None:
            parse_id(content_id, "content_id")  # the page reads it from its URL
        resp.content_type = self._page.content_type
        resp.cache_control = ["no-cache"]
        resp.set_header("Content-Security-Policy", DEMO_POLICY)
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.data = self._page.data
