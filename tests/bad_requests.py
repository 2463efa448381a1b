"""Requests the contract refuses, shared by test_api.py (WebTest) and
test_server.py (real sockets), each with its status and its error code.

Every case runs against a content 1 that already holds one comment (id
``{id}`` in a path), written by author 1; none of them may change the
database.
"""

from __future__ import annotations

import base64
import json
import time
from typing import NamedTuple

import sqlalchemy as sa
from conftest import SECRET

from service.db.tables import comments, content_seqs
from service.web.auth import TokenSigner

JSON = "application/json"
POST_PATH = "/contents/1/comments"
COMMENT_PATH = "/contents/1/comments/{id}"


def doc(value):
    return json.dumps(value).encode()


class Bad(NamedTuple):
    id: str
    method: str
    path: str
    status: int
    #: The error document's ``code`` (docs/api.md, "Errors").
    code: str
    body: bytes | None = None
    content_type: str | None = None
    #: A key of :func:`authorization`, or None for no Authorization header.
    auth: str | None = None

    def target(self, comment_id):
        return self.path.format(id=comment_id)


def post(id, body, status=400, code="invalid_request", *, content_type=JSON, auth="user1",
         path=POST_PATH):
    return Bad(id, "POST", path, status, code, body, content_type, auth)


def get(id, path, status=400, code="invalid_request"):
    return Bad(id, "GET", path, status, code)


def delete(id, status, code, *, auth="user1", path=COMMENT_PATH):
    return Bad(id, "DELETE", path, status, code, auth=auth)


GOOD = doc({"body": "hello"})

BAD_REQUESTS = [
    # -- 400 invalid_request (the helpers' default): the comment document --------------
    post("malformed-json", b'{"body": "x"'),
    post("not-json-at-all", b"body=hello"),
    post("not-utf8", b'{"body": "\xff\xfe"}'),
    post("deeply-nested-json", b"[" * 50_000),
    post("json-array", doc(["hello"])),
    post("json-string", doc("hello")),
    post("json-null", b"null"),
    post("empty-request-body", b""),
    post("missing-body", doc({})),
    post("only-other-field", doc({"text": "hello"})),
    post("body-empty", doc({"body": ""})),
    post("body-blank", doc({"body": "   "})),
    post("body-whitespace", doc({"body": "\n\t \r\n"})),
    post("body-number", doc({"body": 42})),
    post("body-null", doc({"body": None})),
    post("body-bool", doc({"body": True})),
    post("body-list", doc({"body": ["hello"]})),
    post("body-object", doc({"body": {"text": "hello"}})),
    post("body-2001-chars", doc({"body": "x" * 2001})),
    post("body-with-nul", doc({"body": "a\x00b"})),
    post("unknown-field-author_id", doc({"body": "hello", "author_id": 2})),
    post("unknown-field-content_id", doc({"body": "hello", "content_id": 2})),
    post("unknown-field-seq", doc({"body": "hello", "seq": 1})),
    post("unknown-field-id", doc({"body": "hello", "id": 1})),
    post("unknown-field-created_at", doc({"body": "hello", "created_at": "2000-01-01T00:00:00Z"})),
    post("unknown-field-deleted", doc({"body": "hello", "deleted": True})),
    # -- 400 invalid_request: the content id -------------------------------------------
    post("content-id-abc", GOOD, path="/contents/abc/comments"),
    post("content-id-negative", GOOD, path="/contents/-1/comments"),
    post("content-id-zero", GOOD, path="/contents/0/comments"),
    post("content-id-fraction", GOOD, path="/contents/1.5/comments"),
    post("content-id-superscript", GOOD, path="/contents/%C2%B2/comments"),
    post("content-id-over-bigint", GOOD, path=f"/contents/{2**63}/comments"),
    # -- 401 unauthorized: the token ---------------------------------------------------
    post("no-authorization", GOOD, 401, "unauthorized", auth=None),
    post("basic-scheme", GOOD, 401, "unauthorized", auth="basic"),
    post("token-scheme", GOOD, 401, "unauthorized", auth="token-scheme"),
    post("bearer-without-token", GOOD, 401, "unauthorized", auth="bearer-empty"),
    post("garbage-token", GOOD, 401, "unauthorized", auth="garbage"),
    post("token-without-signature", GOOD, 401, "unauthorized", auth="no-signature"),
    post("forged-token", GOOD, 401, "unauthorized", auth="forged"),
    post("tampered-token", GOOD, 401, "unauthorized", auth="tampered"),
    post("expired-token", GOOD, 401, "unauthorized", auth="expired"),
    # -- 413 too_large, 415 unsupported_media_type -------------------------------------
    post("request-over-64KiB", doc({"body": "x" * 70_000}), 413, "too_large"),
    post("text-plain", b"hello", 415, "unsupported_media_type", content_type="text/plain"),
    post("json-as-text-plain", GOOD, 415, "unsupported_media_type", content_type="text/plain"),
    post("no-content-type", GOOD, 415, "unsupported_media_type", content_type=None),
    post("form-encoded", b"body=hello", 415, "unsupported_media_type",
         content_type="application/x-www-form-urlencoded"),
    # -- 400 invalid_request: the feed's parameters ------------------------------------
    get("since-negative", "/contents/1/comments?since=-1&wait=0"),
    get("since-fraction", "/contents/1/comments?since=1.5&wait=0"),
    get("since-word", "/contents/1/comments?since=abc&wait=0"),
    get("since-2**70", f"/contents/1/comments?since={2**70}&wait=0"),
    get("wait-word", "/contents/1/comments?wait=x"),
    get("wait-negative", "/contents/1/comments?wait=-1"),
    get("wait-fraction", "/contents/1/comments?wait=0.5"),
    get("limit-zero", "/contents/1/comments?limit=0"),
    get("limit-201", "/contents/1/comments?limit=201"),
    get("limit-negative", "/contents/1/comments?limit=-5"),
    get("limit-word", "/contents/1/comments?limit=ten"),
    get("path-content-id-abc", "/contents/abc/comments"),
    get("path-content-id-negative", "/contents/-1/comments"),
    get("path-content-id-zero", "/contents/0/comments"),
    get("path-content-id-2**70", f"/contents/{2**70}/comments"),
    get("path-content-id-5000-digits", f"/contents/{'1' * 5000}/comments"),
    get("query-without-content-id", "/comments"),
    get("query-content-id-abc", "/comments?content_id=abc"),
    get("query-content-id-negative", "/comments?content_id=-1"),
    get("query-content-id-zero", "/comments?content_id=0"),
    get("query-content-id-superscript", "/comments?content_id=%C2%B2"),
    get("query-since-negative", "/comments?content_id=1&since=-1&wait=0"),
    get("query-limit-201", "/comments?content_id=1&limit=201"),
    # -- 400 invalid_request: formats, the stream, the demo page -----------------------
    get("format-xml", "/contents/1/comments?format=xml"),
    get("query-format-xml", "/comments?content_id=1&format=xml"),
    get("callback-not-a-name", "/contents/1/comments?callback=alert(1)"),
    get("stream-since-negative", "/contents/1/comments/stream?since=-1"),
    get("stream-content-id-zero", "/contents/0/comments/stream"),
    get("demo-content-id-abc", "/demo/abc"),
    # -- DELETE ------------------------------------------------------------------------
    delete("delete-without-token", 401, "unauthorized", auth=None),
    delete("delete-forged-token", 401, "unauthorized", auth="forged"),
    delete("delete-expired-token", 401, "unauthorized", auth="expired"),
    delete("delete-by-other-user", 403, "forbidden", auth="user2"),
    # Another user's token with its role edited to moderator.
    delete("delete-by-self-made-moderator", 401, "unauthorized", auth="tampered-user2"),
    delete("delete-unknown-comment", 404, "not_found", path="/contents/1/comments/999999"),
    delete("delete-from-other-content", 404, "not_found", path="/contents/2/comments/{id}"),
    delete("delete-comment-id-abc", 400, "invalid_request", path="/contents/1/comments/abc"),
    delete("delete-content-id-zero", 400, "invalid_request", path="/contents/0/comments/{id}"),
]


def _b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def authorization(kind):
    """The ``Authorization`` header value for a kind of credential."""
    signer = TokenSigner(SECRET)
    if kind is None:
        return None
    if kind == "user1":
        return f"Bearer {signer.mint(1)}"
    if kind == "user2":
        return f"Bearer {signer.mint(2)}"
    if kind == "moderator":
        return f"Bearer {signer.mint(99, 'moderator')}"
    if kind == "basic":
        return "Basic " + base64.b64encode(b"alice:secret").decode()
    if kind == "token-scheme":
        return f"Token {signer.mint(1)}"
    if kind == "bearer-empty":
        return "Bearer "
    if kind == "garbage":
        return "Bearer not-a-token"
    if kind == "no-signature":
        return "Bearer " + signer.mint(1).partition(".")[0] + "."
    if kind == "forged":
        return f"Bearer {TokenSigner('another-secret-0123456789abcdef').mint(1)}"
    if kind in ("tampered", "tampered-user2"):
        # A valid signature on a payload that was then rewritten.
        author = 1 if kind == "tampered" else 2
        _, _, signature = signer.mint(author).partition(".")
        claims = {"sub": author, "role": "moderator", "exp": int(time.time()) + 3600}
        return f"Bearer {_b64(json.dumps(claims, separators=(',', ':')).encode())}.{signature}"
    if kind == "expired":
        past = TokenSigner(SECRET, clock=lambda: time.time() - 3600)
        return f"Bearer {past.mint(1, ttl=60)}"
    raise ValueError(kind)


def headers_for(case):
    headers = {}
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    value = authorization(case.auth)
    if value is not None:
        headers["Authorization"] = value
    return headers


def assert_error_document(status, content_type, body, expected, where="", *, code):
    """A refusal: the expected status and a JSON ``{"code", "title",
    "description"}`` with the expected code."""
    assert status == expected, f"{where}: status {status}, expected {expected}: {body[:300]!r}"
    assert content_type is not None and content_type.split(";")[0].strip() == JSON, (
        f"{where}: content type {content_type!r}"
    )
    text = body.decode("utf-8")
    assert "Traceback" not in text and 'File "' not in text, f"{where}: {text[:300]}"
    document = json.loads(text)
    assert isinstance(document, dict), where
    for key in ("title", "description"):
        assert isinstance(document.get(key), str) and document[key].strip(), (
            f"{where}: no {key} in {document}"
        )
    assert document.get("code") == code, f"{where}: code {document.get('code')!r}, expected {code!r}"
    return document


def db_state(app):
    """Every comment row and every content's counter, straight from the database."""
    with app.store.engine.connect() as conn:
        rows = conn.execute(sa.select(comments).order_by(comments.c.id)).all()
        seqs = conn.execute(sa.select(content_seqs).order_by(content_seqs.c.content_id)).all()
    return [tuple(row) for row in rows], [tuple(row) for row in seqs]
