"""Falcon resources: parse and check the request, call a collaborator, answer."""

from __future__ import annotations

import json
import os
import re

import falcon

from ..db.idempotency import IdempotencyKey, KeyReused
from ..db.limits import RateLimited
from ..live.hub import FeedQuery
from . import formats
from .auth import InvalidToken
from .caching import cache_headers

#: Largest id or cursor the database's BIGINT holds.
MAX_ID = 2**63 - 1
#: Page sizes, fixed by the API contract (``limit`` is 1..200, default 50).
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
#: Longest ``Idempotency-Key`` accepted, fixed by the API contract (a UUID
#: is 36; room for a client's own prefixes).
MAX_KEY_CHARS = 255
# The draft's sf-string ("…", with \" and \\ escapes); a bare value is taken as is.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]+")
# ASCII digits, at most ten: int() refuses more than 4300 (a 500).
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?([0-9]{1,10})(?![0-9])\"?", re.IGNORECASE)


def parse_id(text, name):
    # str.isdigit() alone also accepts "²" and "١", and int() refuses more
    # than 4300 digits: either would end in a 500.
    if not (text.isascii() and text.isdigit() and len(text) <= 30) or not (
        1 <= int(text) <= MAX_ID
    ):
        raise falcon.HTTPBadRequest(
            title="Invalid parameter", description=f"{name} must be a positive integer"
        )
    return int(text)


def parse_idempotency_key(req):
    """The request's ``Idempotency-Key`` value, or None if it sent none."""
    value = req.get_header("Idempotency-Key")
    if value is None:
        return None
    quoted = _SF_STRING.fullmatch(value)
    if quoted:
        value = re.sub(r"\\(.)", r"\1", quoted[1])
    if len(value) > MAX_KEY_CHARS or not _PRINTABLE_ASCII.fullmatch(value):
        raise falcon.HTTPBadRequest(
            title="Invalid Idempotency-Key",
            description=f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable ASCII characters",
        )
    return value


def _too_large(limit):
    return falcon.HTTPContentTooLarge(
        title="Request body too large",
        description=f"request bodies are limited to {limit} bytes",
    )


def parse_feed_query(req, content_id, settings):
    """The request's :class:`~service.hub.FeedQuery`, and the wait it asked
    for with ``Prefer`` (None if it did not)."""
    since = req.get_param_as_int("since", min_value=0, max_value=MAX_ID)
    limit = req.get_param_as_int("limit", min_value=1, max_value=MAX_LIMIT,
                                 default=DEFAULT_LIMIT)
    wait = req.get_param_as_int("wait", min_value=0)
    preferred = None
    if wait is None:
        # RFC 7240: a client that cannot add query parameters may
        # still ask for a hold with "Prefer: wait=N".
        match = _PREFER_WAIT.search(req.get_header("Prefer") or "")
        if match:
            wait = preferred = min(int(match[1]), settings.max_wait)
    wait = settings.default_wait if wait is None else min(wait, settings.max_wait)
    return FeedQuery(content_id, since=since, limit=limit, wait=wait), preferred


class _FeedResource:
    def __init__(self, feeds, settings):
        self._feeds = feeds
        self._settings = settings

    def _answer(self, req, resp, content_id):
        fmt, callback = pick_format(req)  # refused before anything is held
        query, preferred = parse_feed_query(req, content_id, self._settings)
        disconnected = req.env.get("waitress.client_disconnected")
        page = self._feeds.read(query, disconnected=disconnected)
        resp.data, headers = formats.render(
            page, fmt, callback=callback,
            accepts_gzip=formats.accepts_gzip(req.get_header("Accept-Encoding")),
            gzip_min_bytes=self._settings.gzip_min_bytes,
        )
        resp.content_type = headers.pop("Content-Type")
        caching = cache_headers(page, self._settings)
        if "Vary" in headers and "Vary" in caching:
            headers["Vary"] = f"{headers['Vary']}, {caching.pop('Vary')}"
        resp.set_headers(headers)
        resp.set_headers(caching)
        if preferred is not None:
            resp.set_header("Preference-Applied", f"wait={preferred}")


def pick_format(req):
    """The feed format a request asks for, and its JSONP callback if any.

    ``callback=`` asks for JSONP (allowed or not by :class:`CallbackGuard`);
    ``format=lines`` or an ``Accept`` preferring ``text/plain`` for lines;
    else JSON.
    """
    fmt = req.get_param("format")
    # Checked even when callback= wins: a bad value is refused wherever it is.
    if fmt is not None and fmt not in (formats.JSON, formats.LINES):
        raise falcon.HTTPBadRequest(
            title="Invalid parameter", description="format must be json or lines"
        )
    callback = req.get_param("callback")
    if callback is not None:
        if not formats.valid_callback(callback):
            raise falcon.HTTPBadRequest(
                title="Invalid parameter",
                description="callback must be a JavaScript name such as cb or app.onComments",
            )
        return formats.JSONP, callback
    if fmt is None:
        plain = req.client_prefers((falcon.MEDIA_JSON, "text/plain")) == "text/plain"
        return (formats.LINES if plain else formats.JSON), None
    return fmt, None


class CallbackGuard:
    """Middleware: ``callback=`` is JSONP, allowed on the long-poll GET
    only, and only with the ``jsonp`` setting on; anywhere else it is
    refused (400) rather than ignored, so no route is ever run as script."""

    def __init__(self, settings):
        self._enabled = settings.jsonp

    def process_resource(self, req, resp, resource, params):
        if resource is None or "callback" not in req.params:
            return
        if not (self._enabled and req.method == "GET" and isinstance(resource, _FeedResource)):
            raise falcon.HTTPBadRequest(
                title="JSONP not allowed",
                description="callback= is only answered on the long-poll GET, with JSONP "
                "turned on (LIVECOMMENTS_JSONP=1)" if not self._enabled else
                "callback= is only answered on the long-poll GET",
            )


class CommentsResource(_FeedResource):
    """``/contents/{content_id}/comments``: read the feed, post a comment."""

    def __init__(self, feeds, settings, *, store, signer, limit):
        super().__init__(feeds, settings)
        self._store = store
        self._signer = signer
        self._limit = limit

    def on_get(self, req, resp, content_id):
        self._answer(req, resp, parse_id(content_id, "content_id"))

    def on_post(self, req, resp, content_id):
        content_id = parse_id(content_id, "content_id")
        principal = authenticate(req, self._signer)
        body = self._read_comment_body(req)
        key = parse_idempotency_key(req)
        if key is not None:
            key = IdempotencyKey(key, self._settings.idempotency_ttl)
        try:
            posted = self._store.post_comment(
                content_id, principal.author_id, body, limit=self._limit, key=key
            )
        except RateLimited as exc:
            raise falcon.HTTPTooManyRequests(
                title="Too many comments",
                description=f"posting again is allowed in {exc.retry_after} s",
                retry_after=exc.retry_after,
            ) from None
        except KeyReused:
            raise falcon.HTTPUnprocessableEntity(
                title="Idempotency-Key reused",
                description="this Idempotency-Key was used for a different request "
                "(another body or content); send a new key for a new comment",
            ) from None
        comment = posted.comment
        if posted.replayed:
            # A replay is an old change, perhaps deleted since: the poller's.
            _announce(self._feeds, content_id, comment.seq)
        else:
            self._feeds.publish_own(content_id, comment)
        resp.status = falcon.HTTP_201
        resp.cache_control = ["no-store"]  # writes are never kept by a cache
        resp.location = f"/contents/{content_id}/comments/{comment.id}"
        resp.media = comment.to_json()
        if posted.replayed:
            resp.set_header("Idempotent-Replayed", "true")

    def _read_comment_body(self, req):
        limit = self._settings.max_body_bytes
        # Refused on Content-Length alone, before a byte of the body is read.
        if req.content_length is not None and req.content_length > limit:
            raise _too_large(limit)
        if req.content_type is None or req.content_type.split(";")[0].strip().lower() != (
            falcon.MEDIA_JSON
        ):
            raise falcon.HTTPUnsupportedMediaType(
                description="send the comment as Content-Type: application/json"
            )
        raw = req.bounded_stream.read(limit + 1)
        if len(raw) > limit:  # chunked bodies carry no Content-Length
            raise _too_large(limit)
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError, [[[[…
            raise _bad_body(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise _bad_body('the request body must be a JSON object like {"body": "text"}')
        unknown = sorted(set(document) - {"body"})
        if unknown:
            raise _bad_body(f"unknown fields: {', '.join(unknown)}")
        body = document.get("body")
        if not isinstance(body, str):
            raise _bad_body('"body" is required and must be a string')
        if not body.strip():
            raise _bad_body('"body" must not be empty or blank')
        if len(body) > self._settings.max_comment_chars:
            raise _bad_body(
                f'"body" is longer than {self._settings.max_comment_chars} characters'
            )
        if "\x00" in body:
            raise _bad_body('"body" must not contain NUL characters')
        try:
            body.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad_body('"body" must not contain unpaired surrogates') from None
        return body


class QueryCommentsResource(_FeedResource):
    """``/comments?content_id=``: the feed for clients that only vary a query."""

    def on_get(self, req, resp):
        content_id = req.get_param("content_id", required=True)
        self._answer(req, resp, parse_id(content_id, "content_id"))


class CommentResource:
    """``/contents/{content_id}/comments/{comment_id}``: delete a comment."""

    def __init__(self, feeds, *, store, signer):
        self._feeds = feeds
        self._store = store
        self._signer = signer

    def on_delete(self, req, resp, content_id, comment_id):
        content_id = parse_id(content_id, "content_id")
        comment_id = parse_id(comment_id, "comment_id")
        principal = authenticate(req, self._signer)
        comment = self._store.get_comment(content_id, comment_id)
        if comment is None:
            raise falcon.HTTPNotFound(
                title="No such comment",
                description=f"content {content_id} has no comment {comment_id}",
            )
        if not principal.may_delete(comment):
            raise falcon.HTTPForbidden(
                title="Not allowed",
                description="only the comment's author or a moderator may delete it",
            )
        tombstone = self._store.delete_comment(content_id, comment_id)
        self._feeds.publish_own(content_id, tombstone)
        resp.status = falcon.HTTP_204
        resp.cache_control = ["no-store"]


class HealthResource:
    """``/healthz``: 200 while the database answers, the pollers keep up
    (none without a successful query for ``stale_after``) and the server serves."""

    def __init__(self, store, hub):
        self._store = store
        self._hub = hub

    def on_get(self, req, resp):
        resp.cache_control = ["no-store"]
        # pid: which process (of ``--workers``) answered.
        about = {"database": self._store.dialect, "pid": os.getpid()}
        if self._hub.closed:
            # A load balancer takes a stopping server out before it goes.
            resp.status = falcon.HTTP_503
            resp.media = {"status": "draining", **about}
            return
        if not self._store.is_healthy():
            resp.status = falcon.HTTP_503
            resp.media = {"status": "unavailable", **about}
            return
        status = self._hub.status()
        if status["pollers"]["stale_count"]:
            # A stuck database connection: the load balancer takes this
            # process out while its viewers would wait in vain.
            resp.status = falcon.HTTP_503
            resp.media = {"status": "stale", **about, **status}
            return
        resp.media = {"status": "ok", **about, **status}


def authenticate(req, signer):
    header = req.get_header("Authorization")
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise falcon.HTTPUnauthorized(
            title="Authentication required",
            description="send Authorization: Bearer <token>",
            challenges=["Bearer"],
        )
    try:
        return signer.verify(token.strip())
    except InvalidToken as exc:
        raise falcon.HTTPUnauthorized(
            title="Invalid token", description=str(exc), challenges=["Bearer"]
        ) from None


def _announce(feeds, content_id, seq):
    """Wake the content's viewers here, and return once the writer's next
    read would show change ``seq`` (read-your-writes)."""
    feeds.wake(content_id)
    feeds.wait_visible(content_id, seq)


def _bad_body(description):
    return falcon.HTTPBadRequest(title="Invalid comment", description=description)
