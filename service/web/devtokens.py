"""``POST /dev/tokens``: a bearer token for any author and role, for the
demo page and local trials. Development mode only: the app adds the route
when ``settings.dev`` is on, so outside it the path does not exist (404).

The body is ``{"author_id": N, "role": "user" | "moderator"}`` (``role``
defaults to ``user``); the answer is 201 ``{"token", "author_id", "role"}``,
a token valid as long as one from ``livecomments mint-token``. Only JSON
bodies are read, so a cross-site form cannot ask for one without a CORS
preflight.
"""

from __future__ import annotations

import json

import falcon

from ..common.errors import ErrorCode
from .auth import ROLES
from .parsing import MAX_ID, json_integer

#: A token's lifetime (seconds): a day, as ``mint-token``'s default.
TOKEN_TTL = 86400
#: Largest body read: the document is a few dozen bytes.
MAX_BODY_BYTES = 1024


class DevTokensResource:
    """``/dev/tokens``: mint a token (development mode only)."""

    def __init__(self, signer):
        self._signer = signer

    def on_post(self, req, resp):
        author_id, role = parse_token_request(req)
        resp.status = falcon.HTTP_201
        resp.cache_control = ["no-store"]
        resp.media = {
            "token": self._signer.mint(author_id, role, TOKEN_TTL),
            "author_id": author_id,
            "role": role,
        }


def parse_token_request(req):
    """``(author_id, role)`` of the request's JSON document, or a 4xx."""
    if req.content_type is None or req.content_type.split(";")[0].strip().lower() != (
        falcon.MEDIA_JSON
    ):
        raise falcon.HTTPUnsupportedMediaType(
            description="send the request as Content-Type: application/json",
            code=ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )
    raw = req.bounded_stream.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise _bad(f"the request body is limited to {MAX_BODY_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        raise _bad("the request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise _bad('the request body must be a JSON object like {"author_id": 1, "role": "user"}')
    unknown = sorted(set(document) - {"author_id", "role"})
    if unknown:
        raise _bad(f"unknown fields: {', '.join(unknown)}")
    author_id = json_integer(document.get("author_id"), 1, MAX_ID)
    if author_id is None:
        raise _bad('"author_id" is required and must be a positive integer')
    role = document.get("role", "user")
    if role not in ROLES:
        raise _bad(f'"role" must be one of {", ".join(ROLES)}')
    return author_id, role


def _bad(description):
    return falcon.HTTPBadRequest(
        title="Invalid token request", description=description, code=ErrorCode.INVALID_REQUEST
    )
