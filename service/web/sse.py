"""Server-sent events: ``GET /contents/{id}/comments/stream``.

A stream is a long-poll that never answers: it waits on the feed through
the hub's own hold (no second wake path) and writes each comment or
tombstone as an unnamed event (what ``EventSource.onmessage`` gets); the
room, moderation events, a reset and the keep-alive are named events:

* ``room`` (data: the room) first, with the cursor as its id (so a client
  renders the room before any change), and at each room change (its seq);
* ``ban`` and ``unban`` (data: the event);
* ``closed`` (data: the room) after the room change that closed the
  content; the stream then ends, and a stream asked of a closed content
  answers 204 No Content, which tells a browser to stop reconnecting.

Rules:

* A stream keeps a waitress thread for its whole life, so it keeps one
  hold slot for its whole life, taken at the start against the streams'
  own cap (``max_streams``, within the hold budget) and given back when it
  ends; its inner holds take no further slot. Beyond the cap: 503 with
  ``Retry-After``, and the client long-polls.
* It resumes after ``Last-Event-ID`` (what a reconnecting browser sends),
  else after ``?since=``; with neither it starts at the current cursor and
  sends no history (a client wanting history GETs the latest page first).
* It ends cleanly after ``sse_max_duration``; the browser reconnects with
  ``Last-Event-ID``, so nothing is lost or repeated.
* Each change's event bytes are encoded once per process, not once per
  stream; the events of a page once per page.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time

import falcon
from cachetools import LRUCache

from ..common.errors import ErrorCode, StoreUnavailable
from ..live.hub import Draining, FeedQuery
from ..live.pages import Kind, open_room
from .parsing import MAX_LIMIT, parse_id, parse_resume_point

logger = logging.getLogger(__name__)

#: Milliseconds a browser waits before it reconnects a stream that ended
#: (the ``retry:`` field): soon enough to miss nothing a viewer notices,
#: late enough that a restarting server is not hammered.
SSE_RETRY_MS = 2000
#: Encoded events kept per process, by (content, seq): the changes that
#: streams of the watched contents are sending or will send next.
EVENT_CACHE_SIZE = 4096


class StreamResource:
    """``/contents/{content_id}/comments/stream``: the feed as events."""

    def __init__(self, hub, settings, *, clock=time.monotonic):
        self._hub = hub
        self._settings = settings
        self._clock = clock
        self._events = EventCache()
        self._retry_after = max(1, math.ceil(settings.shed_poll_after_ms / 1000))

    def on_get(self, req, resp, content_id):
        content_id = parse_id(content_id, "content_id")
        since = parse_resume_point(req)
        budget = self._hub.budget
        if not budget.try_acquire_stream():
            raise falcon.HTTPServiceUnavailable(
                title="Too many streams",
                description="no stream is free now; long-poll GET "
                f"/contents/{content_id}/comments?since=N instead",
                retry_after=self._retry_after,
                code=ErrorCode.UNAVAILABLE,
            )
        stream = None
        try:
            # Loaded whether or not the client names a cursor: while the
            # server drains or the database is down this refuses (503), as
            # a long-poll would, instead of a stream that ends at once and
            # that the browser would reconnect every SSE_RETRY_MS.
            feed = self._hub.feed(content_id)
            if since is None:
                since = feed.last_seq
            room = feed.room  # after the cursor: never older than it
            if not room["closed"]:
                stream = EventStream(
                    self._hub, self._events, content_id, since, self._settings,
                    disconnected=req.env.get("waitress.client_disconnected"),
                    clock=self._clock, room=room,
                )
        finally:
            if stream is None:
                budget.release_stream()
        answer_stream(resp, stream)


def answer_stream(resp, stream):
    """Answer with ``stream``; None (the content, or every one named, is
    closed: nothing will be posted) is 204, on which a browser stops
    reconnecting (a client long-polls, and is asked a long pause)."""
    if stream is None:
        resp.status = falcon.HTTP_204
        resp.cache_control = ["no-store"]
        return
    resp.content_type = "text/event-stream"
    # Never buffered (nginx honours this), cached or compressed on the way.
    resp.set_header("X-Accel-Buffering", "no")
    resp.cache_control = ["no-cache", "no-transform"]
    resp.stream = stream


class SlotStream:
    """The WSGI body of a stream that keeps a stream slot for its life:
    :meth:`close` gives it back, once. Subclasses yield from :meth:`_chunks`.

    A class rather than a generator: waitress closes the body however the
    response ends, and closing a generator that never started would not
    run its cleanup.
    """

    def __init__(self, hub, settings, *, disconnected, clock):
        self._hub = hub
        self._settings = settings
        self._disconnected = disconnected
        self._clock = clock
        self._run = self._chunks()
        self._lock = threading.Lock()
        self._released = False

    def __iter__(self):
        return self._run

    def close(self):
        self._run.close()
        with self._lock:
            released, self._released = self._released, True
        if not released:
            self._hub.budget.release_stream()

    def _gone(self):
        return self._disconnected is not None and self._disconnected()

    def _chunks(self):
        raise NotImplementedError


class EventStream(SlotStream):
    """The stream of one content."""

    def __init__(self, hub, events, content_id, since, settings, *, disconnected, clock,
                 room=None):
        self._events = events
        self._content_id = content_id
        self._cursor = since
        #: The room sent on connect (the feed's, as the stream began).
        self._room = open_room() if room is None else room
        super().__init__(hub, settings, disconnected=disconnected, clock=clock)

    def _chunks(self):
        settings = self._settings
        deadline = self._clock() + settings.sse_max_duration
        yield (
            f"retry: {SSE_RETRY_MS}\n"
            f": livecomments content {self._content_id}, from cursor {self._cursor}, "
            f"keep-alive every {settings.sse_keepalive:g} s\n"
        ).encode() + named_event(self._cursor, "room", self._room) + keepalive_event(self._cursor)
        while not self._gone():
            remaining = deadline - self._clock()
            if remaining <= 0:
                return  # the browser resumes with Last-Event-ID
            query = FeedQuery(self._content_id, since=self._cursor, limit=MAX_LIMIT,
                              wait=min(settings.sse_keepalive, remaining))
            try:
                page = self._hub.read(query, self._disconnected, budgeted=False)
            except Draining:
                return  # the client resumes on another process or after the restart
            except StoreUnavailable as exc:
                logger.error("stream of content %s ended: database error: %s",
                             self._content_id, exc)
                return
            if page.kind is Kind.RESET:
                chunk, ends = page.encoded("sse-reset", _reset_events)
            elif page.changes:
                chunk, ends = page.encoded("sse", self._events.encode_page)
            else:
                chunk = ends = None
            if chunk is not None:
                yield chunk
                if ends:
                    return  # closed: a browser reconnecting is answered 204
            elif self._gone():
                return
            else:
                yield keepalive_event(page.cursor)
            self._cursor = page.cursor


class EventCache:
    """Each change's event bytes, encoded once per process."""

    def __init__(self, size=EVENT_CACHE_SIZE):
        self._cache = LRUCache(size)
        # Taken once per distinct page, by the first stream to send it;
        # streams sharing the page share its bytes without a lock.
        self._lock = threading.Lock()

    def encode_page(self, page):
        """``(bytes, ends)``: the page's events, and whether the stream ends
        after them (the page closed the content: its ``closed`` event is
        among the bytes)."""
        with self._lock:
            data = b"".join(self.event(page.content_id, change) for change in page.changes)
        if closes(page):
            return data + named_event(page.cursor, "closed", page.room), True
        return data, False

    def event(self, content_id, change):
        """A change's event bytes (``id: seq``), encoded once per process."""
        # A seq names one state of one comment for good: a deletion moves
        # the comment to a new seq, so a cached event never goes stale.
        key = (content_id, change.seq)
        data = self._cache.get(key)
        if data is None:
            data = self._cache[key] = encode_event(change)
        return data


def encode_event(change):
    # Unnamed, so a plain ``EventSource`` hands comments and tombstones
    # alike to ``onmessage`` (``data`` says which: ``deleted``); events a
    # client must act on differently (``reset``, ``keepalive``, and the
    # moderation events: ``room`` with the new room, ``ban``, ``unban``)
    # are named, so ``onmessage`` never mistakes them for comments.
    if not change.is_comment:
        data = change.data["room"] if change.type == "room" else change.to_json()
        return named_event(change.seq, change.type, data)
    data = json.dumps(change.to_json(), ensure_ascii=False, separators=(",", ":"))
    return f"id: {change.seq}\ndata: {data}\n\n".encode()


def closes(page):
    """Whether ``page`` closed the content: its last room event closes it
    (and the feed's room, as of the page, is closed: a page read below the
    feed's window may stop short of a reopening)."""
    rooms = [c for c in page.changes if not c.is_comment and c.type == "room"]
    return bool(rooms) and rooms[-1].data["room"]["closed"] and page.closed


def _reset_events(page):
    # The latest page in one event (its room included): the client
    # re-renders from it; then ``closed`` if the room is, and the end.
    data = f"id: {page.cursor}\nevent: reset\ndata: ".encode() + page.body + b"\n\n"
    if page.closed:
        return data + named_event(page.cursor, "closed", page.room), True
    return data, False


def named_event(event_id, name, data):
    data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event_id}\nevent: {name}\ndata: {data}\n\n".encode()


def keepalive_event(cursor):
    # A comment line for proxies, and an event for clients: EventSource
    # hides comments, and a client must see the stream is alive.
    return f": keep-alive\nid: {cursor}\nevent: keepalive\ndata: {cursor}\n\n".encode()
