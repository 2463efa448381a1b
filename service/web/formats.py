"""Feed pages as bytes for each kind of client: JSON, JSONP, lines; gzipped.

Every encoding of a page is made once and kept with the page
(:meth:`~service.pages.Page.encoded`), so the viewers who share a page
share its gzip and its lines too. Resources choose the format; this module
only encodes.
"""

from __future__ import annotations

import gzip
import hashlib
import re

from ..live.many import FeedsPage
from ..live.pages import Kind

JSON = "json"
JSONP = "jsonp"
LINES = "lines"

#: A JSONP callback: an identifier, or up to four dotted ones
#: (``jQuery.cb``), ASCII only. Anything else could inject script.
CALLBACK_PATTERN = re.compile(
    r"[A-Za-z_$][A-Za-z0-9_$]{0,63}(?:\.[A-Za-z_$][A-Za-z0-9_$]{0,63}){0,3}"
)
#: zlib's default trade-off: pages are small and encoded once each, so a
#: higher level buys little and a lower one costs bytes to every viewer.
GZIP_LEVEL = 6

LINES_MEDIA_TYPE = "text/plain; charset=utf-8"
_CONTENT_TYPES = {
    JSON: "application/json",
    JSONP: "application/javascript; charset=utf-8",
    LINES: LINES_MEDIA_TYPE,
}
# Backslash first, so the escapes added after it are not escaped again.
_LINE_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"})
# Valid in JSON strings, but line terminators in JavaScript before ES2019.
_JS_SEPARATORS = (("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029"))


def render(page, fmt=JSON, *, callback=None, accepts_gzip=False, gzip_min_bytes=0):
    """The body and headers answering ``page`` (a feed's
    :class:`~service.live.pages.Page` or a
    :class:`~service.live.many.FeedsPage`) in ``fmt``.

    The body is gzipped when the client accepts it and the plain body is at
    least ``gzip_min_bytes`` (0: never). JSONP is never gzipped: its bytes
    depend on the callback, so they could not be shared. Every answer has
    an ``ETag``: a digest of the bytes sent, so it names the cursors, room,
    format and encoding it says, whoever asks (made once per encoding).
    """
    headers = {"Content-Type": _CONTENT_TYPES[fmt]}
    if fmt == JSONP:
        body = page.encoded("jsonp", _script_safe)
        headers["X-Content-Type-Options"] = "nosniff"
        # "/**/" keeps a callback from starting the file as something
        # else a browser might sniff (the Rosetta Flash attack).
        body = b"/**/" + callback.encode() + b"(" + body + b");"
        headers["ETag"] = _etag(body)
        return body, headers
    headers["Vary"] = "Accept, Accept-Encoding"
    name = fmt
    if fmt == JSON:
        body = page.body
    else:
        body = page.encoded(LINES, encode_feeds_lines if isinstance(page, FeedsPage)
                            else encode_lines)
    if accepts_gzip and gzip_min_bytes and len(body) >= gzip_min_bytes:
        name = f"{fmt}+gzip"
        body = page.encoded(name, lambda p: _gzip(body))
        headers["Content-Encoding"] = "gzip"
    headers["ETag"] = page.encoded(f"{name}:etag", lambda p: _etag(body))
    return body, headers


def etag_matches(etag, if_none_match):
    """Whether ``If-None-Match`` (Falcon's parsed list, or None) names
    ``etag``: the weak comparison RFC 9110 asks of it (a cache may have
    weakened the tag), and ``*``."""
    if not if_none_match:
        return False
    opaque = etag.removeprefix("W/").strip('"')
    return any(tag == "*" or str(tag) == opaque for tag in if_none_match)


def encode_lines(page):
    """The page for devices without a JSON parser.

    First ``cursor N poll_after_ms N reset 0|1 closed 0|1 slow_mode N
    pinned ID`` (the room: ``pinned 0`` when nothing is pinned), then one
    line per change in seq order. A comment's line: seq, comment id, author
    id, deleted (0|1) and body, tab-separated, the body with backslash,
    newline, tab and carriage return escaped as ``\\\\``, ``\\n``,
    ``\\t``, ``\\r`` (a tombstone's body is empty). A reply's line goes on
    with four more fields: its parent's id, author id, deleted (0|1) and
    excerpt, escaped alike (empty once deleted); any other line is as it
    was before replies. A moderation event's second field is a word, where
    a comment's is a number: ``seq room closed slow_mode pinned`` (the new
    room, as in the first line), ``seq ban author_id until`` (RFC 3339, or
    ``-`` for good) and ``seq unban author_id``.
    """
    closed, slow_mode, pinned = _room_values(page.room)
    lines = [f"cursor {page.cursor} poll_after_ms {page.poll_after_ms} "
             f"reset {int(page.kind is Kind.RESET)} "
             f"closed {closed} slow_mode {slow_mode} pinned {pinned}"]
    for change in page.changes:
        if not change.is_comment:
            lines.append(_event_line(change))
            continue
        body = "" if change.body is None else change.body.translate(_LINE_ESCAPES)
        line = f"{change.seq}\t{change.id}\t{change.author_id}\t{int(change.deleted)}\t{body}"
        if change.parent_id is not None:
            excerpt = (change.parent_excerpt or "").translate(_LINE_ESCAPES)
            line += (f"\t{change.parent_id}\t{change.parent_author_id}"
                     f"\t{int(change.parent_deleted)}\t{excerpt}")
        lines.append(line)
    return ("\n".join(lines) + "\n").encode()


def encode_feeds_lines(answer):
    """An answer of several feeds for devices without a JSON parser.

    First ``feeds 42:18,43:5 poll_after_ms N``: the next request's
    ``feeds`` as it is, and the pause. Then each feed in order: its lines
    as a single page's (:func:`encode_lines`), its first line starting
    ``feed 42 cursor …`` and each change's line starting with the content
    id and a tab, so every line names its content.
    """
    out = [f"feeds {answer.cursors} poll_after_ms {answer.poll_after_ms}\n".encode()]
    for page in answer.pages:
        first, *changes = page.encoded(LINES, encode_lines).decode().splitlines()
        prefix = f"{page.content_id}\t"
        out.append(f"feed {page.content_id} {first}\n".encode())
        out.extend(f"{prefix}{line}\n".encode() for line in changes)
    return b"".join(out)


def _room_values(room):
    """The room in lines: closed (0|1), slow mode seconds, pinned comment id (0: none)."""
    pinned = room["pinned"]["id"] if room["pinned"] else 0
    return int(bool(room["closed"])), room["slow_mode_seconds"], pinned


def _event_line(event):
    data = event.data
    if event.type == "room":
        return "\t".join(str(field) for field in (event.seq, "room", *_room_values(data["room"])))
    if event.type == "ban":
        return f"{event.seq}\tban\t{data['author_id']}\t{data.get('until') or '-'}"
    if event.type == "unban":
        return f"{event.seq}\tunban\t{data['author_id']}"
    return f"{event.seq}\t{event.type}"  # a type added later: skip what you do not know


def encode_error_line(code, description):
    """An error for a client reading lines: one line ``error <code>
    <description>``, where a page's first line is ``cursor N …``; the
    description escaped as a body is. (A JSONP request's errors are the JSON
    error document: a browser runs no script answered with an error status.)
    """
    return f"error {code} {description.translate(_LINE_ESCAPES)}\n".encode()


def valid_callback(name):
    return CALLBACK_PATTERN.fullmatch(name) is not None


def accepts_gzip(header):
    """True if an ``Accept-Encoding`` value allows gzip (q above 0)."""
    for item in (header or "").split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        q = params.strip().lower()
        if not q.startswith("q="):
            return True
        try:
            return float(q[2:]) > 0
        except ValueError:
            return False
    return False


def _script_safe(page):
    body = page.body
    for raw, escaped in _JS_SEPARATORS:
        body = body.replace(raw, escaped)
    return body


def _etag(body):
    # 16 bytes of BLAKE2: collisions between two states of a feed are out
    # of reach, and the tag stays short on every metered answer.
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def _gzip(data):
    # mtime=0: the same page gives the same bytes, whichever process made them.
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
