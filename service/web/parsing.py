"""Request parsing: ids in paths, the feed's query (``since``, ``limit``,
``wait`` or ``Prefer: wait``, ``format``/``callback``), a stream's resume
point, the comment document, the ``Idempotency-Key``, and the moderation
documents (a ban, a room's changes).

Each parser returns plain values or raises the 4xx the API contract names
(400, 413, 415) with its code, which the app answers as its error document.
Every cursor (``since``, ``Last-Event-ID``) is parsed here, once.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass

import falcon

from ..common.errors import ErrorCode
from ..live.hub import FeedQuery
from ..live.many import FeedsQuery, format_cursors
from . import formats

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


def _whole_number(text, low):
    """``text`` as an integer in ``low``..:data:`MAX_ID`, or None."""
    # str.isdigit() alone also accepts "²" and "١", and int() refuses more
    # than 4300 digits: either would end in a 500.
    if text.isascii() and text.isdigit() and len(text) <= 30 and low <= int(text) <= MAX_ID:
        return int(text)
    return None


def parse_id(text, name):
    """A path segment naming a content or comment: 1..:data:`MAX_ID`."""
    value = _whole_number(text, 1)
    if value is None:
        raise falcon.HTTPBadRequest(
            title="Invalid parameter", description=f"{name} must be a positive integer",
            code=ErrorCode.INVALID_REQUEST,
        )
    return value


# -- the feed -----------------------------------------------------------------


def parse_since(req):
    """``?since=``: a cursor (0..:data:`MAX_ID`), or None if not sent."""
    return req.get_param_as_int("since", min_value=0, max_value=MAX_ID)


def parse_feed_query(req, content_id, settings):
    """The request's :class:`~service.live.hub.FeedQuery`, and the wait it
    asked for with ``Prefer`` (None if it did not)."""
    since = parse_since(req)
    limit, wait, preferred = _limit_and_wait(req, settings)
    return FeedQuery(content_id, since=since, limit=limit, wait=wait), preferred


def parse_feeds_query(req, settings):
    """A read of several feeds (``?feeds=``): its
    :class:`~service.live.many.FeedsQuery`, the wait asked with ``Prefer``
    (or None), and the canonical ``feeds`` text if the request's is not
    (None if it is: see :func:`parse_feeds`)."""
    cursors, canonical = parse_feeds(req, settings)
    limit, wait, preferred = _limit_and_wait(req, settings)
    return FeedsQuery(cursors, limit=limit, wait=wait), preferred, canonical


def _limit_and_wait(req, settings):
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
    return limit, wait, preferred


# -- several feeds --------------------------------------------------------------

#: The longest ``content_id:cursor`` (two BIGINTs, a colon, a comma): a
#: query string longer than ``max_feeds`` of them and :data:`QUERY_SLACK`
#: is refused (414) before it is split.
FEED_ENTRY_CHARS = 2 * len(str(MAX_ID)) + 2
#: Room for the other parameters (wait, limit, format, callback, and a
#: cache-buster or two a client adds).
QUERY_SLACK = 512


def parse_feeds(req, settings):
    """``?feeds=42:17,43:5,44``: ``((content_id, cursor or None), …)`` in
    ascending content id, and the canonical text if the request's differs
    (another order, leading zeros), else None.

    Refused: a query string too long to be one (414), no list, more than
    ``max_feeds`` entries, a duplicate content, an entry that is not
    ``id`` or ``id:cursor``.
    """
    if "feeds" not in req.params:
        raise _bad_feeds("feeds is required: a list such as 42:17,43:5,44")
    if len(req.query_string) > settings.max_feeds * FEED_ENTRY_CHARS + QUERY_SLACK:
        raise falcon.HTTPUriTooLong(
            title="URL too long",
            description=f"a request names at most {settings.max_feeds} feeds",
            code=ErrorCode.TOO_LARGE,
        )
    text = req.params.get("feeds")  # a list if sent twice
    if not isinstance(text, str) or not text:
        raise _bad_feeds("feeds must be one list such as 42:17,43:5,44 (content_id:cursor, "
                         "or a bare content_id for its latest page)")
    entries = text.split(",")
    if len(entries) > settings.max_feeds:
        raise falcon.HTTPBadRequest(
            title="Too many feeds",
            description=f"a request names at most {settings.max_feeds} feeds, "
            f"this one {len(entries)}",
            code=ErrorCode.TOO_MANY_FEEDS,
        )
    cursors = parse_cursor_list(entries, bare=True)
    if cursors is None:
        raise _bad_feeds("each of feeds must be content_id:cursor (whole numbers) or a bare "
                         "content_id, comma-separated, such as 42:17,43:5,44")
    cursors.sort(key=lambda entry: entry[0])  # a bare entry's None sorts with nothing
    for (first, _), (second, _) in itertools.pairwise(cursors):
        if first == second:
            raise _bad_feeds(f"feeds names content {first} twice")
    canonical = format_cursors(cursors)
    return tuple(cursors), (None if canonical == text else canonical)


def parse_cursor_list(entries, *, bare):
    """``["42:17", "44"]`` as ``[(42, 17), (44, None)]`` (a bare id only
    if ``bare``); None if any entry is malformed."""
    cursors = []
    for entry in entries:
        content_text, colon, cursor_text = entry.partition(":")
        content_id = _whole_number(content_text, 1)
        cursor = _whole_number(cursor_text, 0) if colon else None
        if content_id is None or (colon and cursor is None) or (not colon and not bare):
            return None
        cursors.append((content_id, cursor))
    return cursors


def parse_feeds_resume(req, cursors):
    """A stream of several feeds resumes each feed after its cursor in
    ``Last-Event-ID`` (``42:18,43:5``, what a reconnecting browser sends),
    else after the URL's (``cursors``); contents it names that the URL does
    not are ignored."""
    last_id = (req.get_header("Last-Event-ID") or "").strip()
    if not last_id:
        return cursors
    resumed = parse_cursor_list(last_id.split(","), bare=False)
    if resumed is None:
        raise falcon.HTTPBadRequest(
            title="Invalid header",
            description="Last-Event-ID must be content_id:cursor, comma-separated",
            code=ErrorCode.INVALID_REQUEST,
        )
    resumed = dict(resumed)
    return tuple((cid, resumed.get(cid, since)) for cid, since in cursors)


def _bad_feeds(description):
    return falcon.HTTPBadRequest(
        title="Invalid parameter", description=description, code=ErrorCode.INVALID_REQUEST
    )


def pick_format(req):
    """The feed format a request asks for, and its JSONP callback if any.

    ``callback=`` asks for JSONP (allowed or not by
    :class:`~service.web.resources.CallbackGuard`); ``format=lines`` or an
    ``Accept`` preferring ``text/plain`` for lines; else JSON.
    """
    fmt = req.get_param("format")
    # Checked even when callback= wins: a bad value is refused wherever it is.
    if fmt is not None and fmt not in (formats.JSON, formats.LINES):
        raise falcon.HTTPBadRequest(
            title="Invalid parameter", description="format must be json or lines",
            code=ErrorCode.INVALID_REQUEST,
        )
    callback = req.get_param("callback")
    if callback is not None:
        if not formats.valid_callback(callback):
            raise falcon.HTTPBadRequest(
                title="Invalid parameter",
                description="callback must be a JavaScript name such as cb or app.onComments",
                code=ErrorCode.INVALID_REQUEST,
            )
        return formats.JSONP, callback
    if fmt is None:
        plain = req.client_prefers((falcon.MEDIA_JSON, "text/plain")) == "text/plain"
        return (formats.LINES if plain else formats.JSON), None
    return fmt, None


def parse_resume_point(req):
    """The cursor a stream resumes after: ``Last-Event-ID`` (a reconnecting
    browser's), else ``?since=``, else None (now). A bad ``since`` is
    refused even beside the header that wins over it."""
    since = parse_since(req)
    last_id = req.get_header("Last-Event-ID")
    if last_id is not None and last_id.strip():
        cursor = _whole_number(last_id.strip(), 0)
        if cursor is None:
            raise falcon.HTTPBadRequest(
                title="Invalid header", description="Last-Event-ID must be a cursor (0 or more)",
                code=ErrorCode.INVALID_REQUEST,
            )
        return cursor
    return since


# -- a posted comment ---------------------------------------------------------


def parse_comment(req, settings):
    """``(body, parent_id)`` of the request's ``{"body": "text"}`` document
    (``parent_id``, optional: the comment replied to, or None), read within
    ``settings.max_body_bytes``."""
    document = read_document(req, settings, _bad_body, '{"body": "text"}')
    unknown = sorted(set(document) - {"body", "parent_id"})
    if unknown:
        raise _bad_body(f"unknown fields: {', '.join(unknown)}")
    body = document.get("body")
    if not isinstance(body, str):
        raise _bad_body('"body" is required and must be a string')
    if not body.strip():
        raise _bad_body('"body" must not be empty or blank')
    if len(body) > settings.max_comment_chars:
        raise _bad_body(f'"body" is longer than {settings.max_comment_chars} characters')
    if "\x00" in body:
        raise _bad_body('"body" must not contain NUL characters')
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad_body('"body" must not contain unpaired surrogates') from None
    parent_id = document.get("parent_id")
    if parent_id is not None:
        parent_id = json_integer(parent_id, 1, MAX_ID)
        if parent_id is None:
            raise _bad_body('"parent_id" must be a comment\'s id (a positive integer) or null')
    return body, parent_id


def read_document(req, settings, bad, example):
    """The request's JSON object, read within ``settings.max_body_bytes``
    (413 beyond, 415 if not sent as JSON); anything else is ``bad(description)``
    (a 400), ``example`` saying what an object looks like."""
    limit = settings.max_body_bytes
    # Refused on Content-Length alone, before a byte of the body is read.
    if req.content_length is not None and req.content_length > limit:
        raise _too_large(limit)
    if req.content_type is None or req.content_type.split(";")[0].strip().lower() != (
        falcon.MEDIA_JSON
    ):
        raise falcon.HTTPUnsupportedMediaType(
            description="send the document as Content-Type: application/json",
            code=ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        )
    raw = req.bounded_stream.read(limit + 1)
    if len(raw) > limit:  # chunked bodies carry no Content-Length
        raise _too_large(limit)
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError, [[[[…
        raise bad(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise bad(f"the request body must be a JSON object like {example}")
    return document


def json_integer(value, low, high):
    """A JSON number that is a whole number in ``low``..``high``, as an int;
    else None (true and false are no numbers; 12.0 is JSON's 12 too)."""
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int or not low <= value <= high:
        return None
    return value


def _text_ok(text):
    """A string PostgreSQL and SQLite store as sent: no NUL, no unpaired surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- moderation ---------------------------------------------------------------

#: Limits of a ban, fixed by the API contract: ``seconds`` up to a year,
#: a ``reason`` of 200 characters at most.
MAX_BAN_SECONDS = 365 * 24 * 3600
MAX_REASON_CHARS = 200
#: The longest slow mode, fixed by the API contract (0 is off).
MAX_SLOW_MODE_SECONDS = 600


@dataclass(frozen=True)
class BanRequest:
    author_id: int
    seconds: int | None
    retract: bool
    reason: str | None


def parse_ban(req, settings):
    """The :class:`BanRequest` of ``{"author_id": N, "seconds": S | null,
    "retract": bool, "reason": "…" | null}`` (all but ``author_id`` optional:
    for good, no retraction, no reason)."""
    document = read_document(req, settings, _bad_ban, '{"author_id": 7, "seconds": 600}')
    unknown = sorted(set(document) - {"author_id", "seconds", "retract", "reason"})
    if unknown:
        raise _bad_ban(f"unknown fields: {', '.join(unknown)}")
    author_id = json_integer(document.get("author_id"), 1, MAX_ID)
    if author_id is None:
        raise _bad_ban('"author_id" is required and must be an author\'s id (a positive integer)')
    seconds = document.get("seconds")
    if seconds is not None:
        seconds = json_integer(seconds, 1, MAX_BAN_SECONDS)
        if seconds is None:
            raise _bad_ban(f'"seconds" must be an integer from 1 to {MAX_BAN_SECONDS:,} '
                           "(a year), or null for good")
    retract = document.get("retract", False)
    if type(retract) is not bool:
        raise _bad_ban('"retract" must be true or false')
    reason = document.get("reason")
    if reason is not None:
        if not isinstance(reason, str):
            raise _bad_ban('"reason" must be a string or null')
        if len(reason) > MAX_REASON_CHARS:
            raise _bad_ban(f'"reason" is longer than {MAX_REASON_CHARS} characters')
        if not _text_ok(reason):
            raise _bad_ban('"reason" must not contain NUL characters or unpaired surrogates')
    return BanRequest(author_id, seconds, retract, reason)


#: The fields of a room's PATCH.
_ROOM_FIELDS = ("slow_mode_seconds", "closed", "pinned_comment_id")


def parse_room_patch(req, settings):
    """The changes a ``PATCH`` of a room asks for: a dict of one or more of
    ``slow_mode_seconds`` (0..:data:`MAX_SLOW_MODE_SECONDS`), ``closed``
    (a bool) and ``pinned_comment_id`` (an id, or None to unpin)."""
    document = read_document(req, settings, _bad_room, '{"closed": true}')
    unknown = sorted(set(document) - set(_ROOM_FIELDS))
    if unknown:
        raise _bad_room(f"unknown fields: {', '.join(unknown)}; a room has "
                        f"{', '.join(_ROOM_FIELDS)}")
    if not document:
        raise _bad_room(f"nothing to change: send one or more of {', '.join(_ROOM_FIELDS)}")
    changes = {}
    if "slow_mode_seconds" in document:
        changes["slow_mode_seconds"] = json_integer(
            document["slow_mode_seconds"], 0, MAX_SLOW_MODE_SECONDS)
        if changes["slow_mode_seconds"] is None:
            raise _bad_room(f'"slow_mode_seconds" must be an integer from 0 (off) '
                            f"to {MAX_SLOW_MODE_SECONDS}")
    if "closed" in document:
        if type(document["closed"]) is not bool:
            raise _bad_room('"closed" must be true or false')
        changes["closed"] = document["closed"]
    if "pinned_comment_id" in document:
        pinned = document["pinned_comment_id"]
        if pinned is not None:
            pinned = json_integer(pinned, 1, MAX_ID)
            if pinned is None:
                raise _bad_room('"pinned_comment_id" must be a comment\'s id (a positive '
                                "integer), or null to unpin")
        changes["pinned_comment_id"] = pinned
    return changes


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
            code=ErrorCode.INVALID_REQUEST,
        )
    return value


def _too_large(limit):
    return falcon.HTTPContentTooLarge(
        title="Request body too large",
        description=f"request bodies are limited to {limit} bytes",
        code=ErrorCode.TOO_LARGE,
    )


def _bad_body(description):
    return falcon.HTTPBadRequest(
        title="Invalid comment", description=description, code=ErrorCode.INVALID_REQUEST
    )


def _bad_ban(description):
    return falcon.HTTPBadRequest(
        title="Invalid ban", description=description, code=ErrorCode.INVALID_REQUEST
    )


def _bad_room(description):
    return falcon.HTTPBadRequest(
        title="Invalid room change", description=description, code=ErrorCode.INVALID_REQUEST
    )
