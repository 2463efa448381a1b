"""Falcon resources: parse the request (with :mod:`.parsing`), check who
asks, call a collaborator, answer."""

from __future__ import annotations

import os

import falcon

from ..common.errors import ErrorCode
from ..db.idempotency import IdempotencyKey, KeyReused
from ..db.limits import RateLimited
from ..db.moderation import Banned, Closed, Duplicate, SlowMode
from ..db.replies import ParentDeleted, ParentMissing
from . import formats
from .auth import InvalidToken
from .caching import cache_headers
from .parsing import (
    parse_comment,
    parse_feed_query,
    parse_feeds_query,
    parse_id,
    parse_idempotency_key,
    pick_format,
)
from .redirects import redirect_to_canonical


class _FeedResource:
    def __init__(self, feeds, settings):
        self._feeds = feeds
        self._settings = settings

    def _answer(self, req, resp, content_id=None):
        """Answer the feed of ``content_id`` (the path's text; None: the
        query's) in the format the request asks for, and so its refusals
        once that format is known (see app.serialize_error)."""
        fmt, callback = pick_format(req)  # refused before anything is held
        req.context.answer_format = fmt
        if content_id is None:
            content_id = req.get_param("content_id", required=True)
        content_id = parse_id(content_id, "content_id")
        query, preferred = parse_feed_query(req, content_id, self._settings)
        disconnected = req.env.get("waitress.client_disconnected")
        page = self._feeds.read(query, disconnected=disconnected)
        self._send(req, resp, page, fmt, callback, preferred)

    def _answer_many(self, req, resp):
        """Answer a read of several feeds (``?feeds=``), as :meth:`_answer`
        a single one; a list not in canonical form is redirected to it."""
        fmt, callback = pick_format(req)
        req.context.answer_format = fmt
        if "content_id" in req.params:
            raise falcon.HTTPBadRequest(
                title="Invalid parameter",
                description="send content_id (one feed) or feeds (several), not both",
                code=ErrorCode.INVALID_REQUEST,
            )
        query, preferred, canonical = parse_feeds_query(req, self._settings)
        if canonical is not None:
            redirect_to_canonical(req, canonical)
        disconnected = req.env.get("waitress.client_disconnected")
        page = self._feeds.read_many(query, disconnected=disconnected)
        self._send(req, resp, page, fmt, callback, preferred)

    def _send(self, req, resp, page, fmt, callback, preferred):
        """The answer's body and headers; 304 and no body when the client's
        ``If-None-Match`` names the answer's ``ETag`` (it has these bytes)."""
        body, headers = formats.render(
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
        if formats.etag_matches(headers["ETag"], req.if_none_match):
            resp.status = falcon.HTTP_304
            resp.delete_header("Content-Type")
            resp.delete_header("Content-Encoding")
            return
        resp.data = body


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
                code=ErrorCode.INVALID_REQUEST,
            )


class CommentsResource(_FeedResource):
    """``/contents/{content_id}/comments``: read the feed, post a comment."""

    def __init__(self, feeds, settings, *, store, signer, limit):
        super().__init__(feeds, settings)
        self._store = store
        self._signer = signer
        self._limit = limit

    def on_get(self, req, resp, content_id):
        self._answer(req, resp, content_id)

    def on_post(self, req, resp, content_id):
        content_id = parse_id(content_id, "content_id")
        principal = authenticate(req, self._signer)
        body, parent_id = parse_comment(req, self._settings)
        key = parse_idempotency_key(req)
        if key is not None:
            key = IdempotencyKey(key, self._settings.idempotency_ttl)
        try:
            posted = self._store.post_comment(
                content_id, principal.author_id, body, limit=self._limit, key=key,
                parent_id=parent_id, duplicate_window=self._settings.duplicate_window,
                exempt_slow_mode=principal.is_moderator,
            )
        except Closed:
            raise falcon.HTTPConflict(
                title="Content closed",
                description=f"content {content_id} is closed: it takes no more comments",
                code=ErrorCode.CLOSED,
            ) from None
        except Banned as exc:
            raise _banned(content_id, exc) from None
        except SlowMode as exc:
            raise falcon.HTTPTooManyRequests(
                title="Slow mode",
                description=f"content {content_id} is in slow mode: posting again here is "
                f"allowed in {exc.retry_after} s",
                retry_after=exc.retry_after,
                code=ErrorCode.SLOW_MODE,
            ) from None
        except Duplicate:
            raise falcon.HTTPConflict(
                title="Duplicate comment",
                description="you have just posted this same comment here",
                code=ErrorCode.DUPLICATE,
            ) from None
        except RateLimited as exc:
            raise falcon.HTTPTooManyRequests(
                title="Too many comments",
                description=f"posting again is allowed in {exc.retry_after} s",
                retry_after=exc.retry_after,
                code=ErrorCode.RATE_LIMITED,
            ) from None
        except KeyReused:
            raise falcon.HTTPUnprocessableEntity(
                title="Idempotency-Key reused",
                description="this Idempotency-Key was used for a different request "
                "(another body, parent or content); send a new key for a new comment",
                code=ErrorCode.KEY_REUSED,
            ) from None
        except ParentMissing:
            raise falcon.HTTPBadRequest(
                title="No such parent",
                description=f"parent_id {parent_id} is no comment of content {content_id}",
                code=ErrorCode.INVALID_REQUEST,
            ) from None
        except ParentDeleted:
            raise falcon.HTTPConflict(
                title="Parent deleted",
                description=f"comment {parent_id} was deleted: there is nothing to reply to",
                code=ErrorCode.PARENT_DELETED,
            ) from None
        comment = posted.comment
        if posted.replayed:
            # A replay is an old change, perhaps deleted since: the poller's.
            announce(self._feeds, content_id, comment.seq)
        else:
            self._feeds.publish_own(content_id, comment)
        resp.status = falcon.HTTP_201
        resp.cache_control = ["no-store"]  # writes are never kept by a cache
        resp.location = f"/contents/{content_id}/comments/{comment.id}"
        resp.media = comment.to_json()
        if posted.replayed:
            resp.set_header("Idempotent-Replayed", "true")


class QueryCommentsResource(_FeedResource):
    """``/comments?content_id=``: the feed for clients that only vary a
    query; ``/comments?feeds=42:17,43:5``: several feeds in one read."""

    def on_get(self, req, resp):
        if "feeds" in req.params:
            self._answer_many(req, resp)
        else:
            self._answer(req, resp)


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
                code=ErrorCode.NOT_FOUND,
            )
        if not principal.may_delete(comment):
            raise falcon.HTTPForbidden(
                title="Not allowed",
                description="only the comment's author or a moderator may delete it",
                code=ErrorCode.FORBIDDEN,
            )
        changes = self._store.remove_comment(content_id, comment_id)
        if len(changes) == 1:
            self._feeds.publish_own(content_id, changes[0])
        else:  # the pinned comment: unpinned by a room event after it
            announce(self._feeds, content_id, changes[-1].seq)
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
            code=ErrorCode.UNAUTHORIZED,
        )
    try:
        return signer.verify(token.strip())
    except InvalidToken as exc:
        raise falcon.HTTPUnauthorized(
            title="Invalid token", description=str(exc), challenges=["Bearer"],
            code=ErrorCode.UNAUTHORIZED,
        ) from None


def announce(feeds, content_id, seq):
    """Wake the content's viewers here, and return once the writer's next
    read would show change ``seq`` (read-your-writes): the poller fetches
    the changes up to it, however many one write made."""
    feeds.wake(content_id)
    feeds.wait_visible(content_id, seq)


def _banned(content_id, exc):
    """The 403 of a banned author: the document's ``until`` (RFC 3339, or
    null for good), and for a timed ban ``Retry-After``."""
    until = exc.until_text
    error = falcon.HTTPForbidden(
        title="Banned",
        description=f"you are banned from content {content_id} "
        + ("for good" if until is None else f"until {until}"),
        code=ErrorCode.BANNED,
        headers=None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)},
    )
    error.extra = {"until": until}
    return error
