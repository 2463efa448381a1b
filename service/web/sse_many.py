"""One event stream for several feeds: ``GET /comments/stream?feeds=…``.

The single stream's rules (:mod:`.sse`) hold, with one stream slot for the
whole connection however many feeds it names, and these differences:

* every event's data names its ``content_id`` (a comment's and a
  tombstone's already do; ``room``, ``ban``, ``unban``, ``closed`` get it
  added; a ``reset`` carries that feed's latest page, which has it);
* every ``id:`` is the cursor of **every** feed after that event, in one
  compact text (``42:18,43:5``), so a browser reconnecting with
  ``Last-Event-ID`` resumes each feed from its own cursor;
* a feed that closes sends ``closed`` and the stream goes on for the
  others (a moderator reopening it wakes the stream again); a stream asked
  of contents that are all closed answers 204, as a single one does.

The stream waits through the hub's read of several feeds, so it adds no
wake path of its own, and the feeds' pollers stay one per content.
"""

from __future__ import annotations

import logging
import math
import time

import falcon

from ..common.errors import ErrorCode, StoreUnavailable
from ..live.hub import Draining
from ..live.many import FeedsQuery, format_cursors
from ..live.pages import Kind
from .parsing import MAX_LIMIT, parse_feeds, parse_feeds_resume
from .redirects import redirect_to_canonical
from .sse import (
    SSE_RETRY_MS,
    EventCache,
    SlotStream,
    answer_stream,
    closes,
    keepalive_event,
    named_event,
)

logger = logging.getLogger(__name__)


class FeedsStreamResource:
    """``/comments/stream?feeds=…``: several feeds as one event stream."""

    def __init__(self, hub, settings, *, clock=time.monotonic):
        self._hub = hub
        self._settings = settings
        self._clock = clock
        self._retry_after = max(1, math.ceil(settings.shed_poll_after_ms / 1000))
        self._cache = EventCache()

    def on_get(self, req, resp):
        cursors, canonical = parse_feeds(req, self._settings)
        if canonical is not None:
            redirect_to_canonical(req, canonical)
        cursors = parse_feeds_resume(req, cursors)
        budget = self._hub.budget
        if not budget.try_acquire_stream():
            raise falcon.HTTPServiceUnavailable(
                title="Too many streams",
                description="no stream is free now; long-poll GET /comments?feeds=… instead",
                retry_after=self._retry_after,
                code=ErrorCode.UNAVAILABLE,
            )
        stream = None
        try:
            # Loaded now, as a single stream's feed is: a draining server or
            # a database that does not answer refuses here (503).
            feeds = [self._hub.feed(content_id) for content_id, _ in cursors]
            # A bare content starts at its current cursor, with no history;
            # each room is read after its cursor, so never older than it.
            start = {feed.content_id: (feed.last_seq if since is None else since)
                     for feed, (_, since) in zip(feeds, cursors, strict=True)}
            rooms = {feed.content_id: feed.room for feed in feeds}
            if not all(room["closed"] for room in rooms.values()):
                stream = FeedsEventStream(
                    self._hub, self._cache, start, rooms, self._settings,
                    disconnected=req.env.get("waitress.client_disconnected"),
                    clock=self._clock,
                )
        finally:
            if stream is None:
                budget.release_stream()
        answer_stream(resp, stream)  # None: every one is closed, 204


class FeedsEventStream(SlotStream):
    """The stream of several feeds (its slot: see :class:`.sse.SlotStream`)."""

    def __init__(self, hub, cache, cursors, rooms, settings, *, disconnected, clock):
        self._cache = cache
        #: content id -> cursor, ascending (the order of the compact id).
        self._cursors = dict(sorted(cursors.items()))
        self._rooms = rooms
        super().__init__(hub, settings, disconnected=disconnected, clock=clock)

    def _id(self):
        return format_cursors(self._cursors.items())

    def _chunks(self):
        settings = self._settings
        deadline = self._clock() + settings.sse_max_duration
        first = [(f"retry: {SSE_RETRY_MS}\n: livecomments feeds {self._id()}, keep-alive every "
                  f"{settings.sse_keepalive:g} s\n").encode()]
        for content_id in self._cursors:
            first.append(named_event(self._id(), "room",
                                     _naming(content_id, self._rooms[content_id])))
        yield b"".join(first) + keepalive_event(self._id())
        while not self._gone():
            remaining = deadline - self._clock()
            if remaining <= 0:
                return  # the browser resumes with Last-Event-ID
            query = FeedsQuery(tuple(self._cursors.items()), limit=MAX_LIMIT,
                               wait=min(settings.sse_keepalive, remaining))
            try:
                answer = self._hub.read_many(query, self._disconnected, budgeted=False)
            except Draining:
                return
            except StoreUnavailable as exc:
                logger.error("stream of feeds %s ended: database error: %s", self._id(), exc)
                return
            chunk = b"".join(self._events(page) for page in answer.pages)
            if chunk:
                yield chunk
            elif self._gone():
                return
            else:
                yield keepalive_event(self._id())

    def _events(self, page):
        """The events of one feed's page, each with the compact id after it."""
        content_id = page.content_id
        if page.kind is Kind.RESET:
            self._cursors[content_id] = page.cursor
            data = (f"id: {self._id()}\nevent: reset\ndata: ".encode() + page.body + b"\n\n")
            if page.closed:
                data += named_event(self._id(), "closed", _naming(content_id, page.room))
            return data
        out = []
        for change in page.changes:
            self._cursors[content_id] = change.seq
            out.append(self._event(content_id, change))
        self._cursors[content_id] = page.cursor
        if page.changes and closes(page):
            out.append(named_event(self._id(), "closed", _naming(content_id, page.room)))
        return b"".join(out)

    def _event(self, content_id, change):
        """A change's event with the compact id: a comment or tombstone as a
        single stream sends it (bytes shared), a moderation event naming
        its content."""
        if change.is_comment:
            data = self._cache.event(content_id, change)  # "id: seq\ndata: …"
            return f"id: {self._id()}\n".encode() + data[data.index(b"\n") + 1:]
        data = change.data["room"] if change.type == "room" else change.to_json()
        return named_event(self._id(), change.type, _naming(content_id, data))


def _naming(content_id, data):
    return {"content_id": content_id, **data}
