"""The one error document and its fixed list of codes, and the error the
store raises when the database does not answer (so no layer above ``db``
needs SQLAlchemy's)."""

from __future__ import annotations

import enum
import json

#: Media type of every error document.
ERROR_MEDIA_TYPE = "application/json"


class ErrorCode(enum.StrEnum):
    """The ``code`` of an error document: the fixed list of the contract.

    Clients branch on it, so it is stable: codes may be added, none renamed
    or removed, and none is made up at a raise site. The same list, with
    each code's meaning, is the table of docs/api.md's "Errors" and the
    enum of the ``Error`` schema in ``docs/openapi.yaml``
    (``tests/test_contract.py`` holds the three equal). Each member has the
    HTTP ``statuses`` it is sent with and whether it is ``reserved``: named
    for a feature to come, not sent yet.
    """

    def __new__(cls, value, statuses, reserved=False):
        member = str.__new__(cls, value)
        member._value_ = value
        member.statuses = statuses
        member.reserved = reserved
        return member

    #: A bad id, parameter, header or comment document; a ``callback``
    #: where JSONP is not allowed; framing the server will not read.
    INVALID_REQUEST = "invalid_request", (400,)
    #: No usable bearer token.
    UNAUTHORIZED = "unauthorized", (401,)
    #: The token may not do this (delete another author's comment).
    FORBIDDEN = "forbidden", (403,)
    #: No such comment, static file or path.
    NOT_FOUND = "not_found", (404,)
    #: The path does not take this method.
    METHOD_NOT_ALLOWED = "method_not_allowed", (405,)
    #: The request was not received within ``header_timeout`` (the server's).
    TIMEOUT = "timeout", (408,)
    #: The request body (413), URL (414) or head (431) is over the limit.
    TOO_LARGE = "too_large", (413, 414, 431)
    #: The request body is not JSON.
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", (415,)
    #: An ``Idempotency-Key`` reused for a different request.
    KEY_REUSED = "key_reused", (422,)
    #: The author posts too fast (the posting limit).
    RATE_LIMITED = "rate_limited", (429,)
    #: A reply to a comment that has been deleted.
    PARENT_DELETED = "parent_deleted", (409,)
    #: A read names more feeds than ``max_feeds`` (``?feeds=``).
    TOO_MANY_FEEDS = "too_many_feeds", (400,)
    #: A fault of the server's.
    INTERNAL_ERROR = "internal_error", (500,)
    #: Not now: the database does not answer, the process drains, no event
    #: stream is free, the client address has too many connections.
    UNAVAILABLE = "unavailable", (503,)
    # Moderation's refusals of a post (issue 15).
    #: The content is in slow mode: the author's previous comment here is
    #: too recent (``Retry-After``).
    SLOW_MODE = "slow_mode", (429,)
    #: The author is banned from this content (the document's ``until``;
    #: ``Retry-After`` for a timed ban).
    BANNED = "banned", (403,)
    #: The content is closed: it takes no more comments.
    CLOSED = "closed", (409,)
    #: The author posted the same comment here within the duplicate window.
    DUPLICATE = "duplicate", (409,)


_BY_STATUS = {}
for _code in ErrorCode:
    if not _code.reserved:
        for _status in _code.statuses:
            _BY_STATUS.setdefault(_status, _code)


def code_for_status(status):
    """The code an error of HTTP ``status`` carries when its raiser names
    none: the list's for that status, else ``invalid_request`` for a 4xx
    and ``internal_error`` for a 5xx."""
    code = _BY_STATUS.get(status)
    if code is not None:
        return code
    return ErrorCode.INTERNAL_ERROR if status >= 500 else ErrorCode.INVALID_REQUEST


class StoreUnavailable(Exception):
    """The database did not answer (refused, dropped, timed out) or failed
    the statement. Retrying later may succeed; the store has already
    rolled back. The message is one line; the driver's error is the cause."""


def error_document(code, title, description=None, **extra):
    """The body of every error the service sends, as bytes: ``code`` (an
    :class:`ErrorCode`, or its value; anything else is a ValueError),
    ``title`` and ``description`` (the title again when there is none),
    plus ``extra``."""
    body = {"code": ErrorCode(code).value, "title": title, "description": description or title}
    body.update(extra)
    return json.dumps(body).encode()
