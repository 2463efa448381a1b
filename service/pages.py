"""The long-poll response body, encoded once and shared by every viewer.

Nothing in it depends on who asks: viewers at the same cursor get the same
bytes, so the process encodes each page once, and an HTTP cache in front
may hand one upstream answer to all of them.
"""

from __future__ import annotations

import json


def encode_page(content_id, comments, cursor, *, poll_after_ms=0, reset=False):
    """Encode a feed response to JSON bytes."""
    return json.dumps(
        {
            "content_id": content_id,
            "comments": [comment.to_json() for comment in comments],
            "cursor": cursor,
            "poll_after_ms": poll_after_ms,
            "reset": reset,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


def read_page(store, content_id, since, limit, *, reset_after, poll_after_ms=0):
    """Answer a feed read from the store, at once.

    No ``since``, a ``since`` ahead of the content (the database was
    replaced) or one more than ``reset_after`` changes behind: the latest
    page with ``reset`` set. Otherwise the next ``limit`` changes.
    """
    if since is not None:
        current = store.current_seq(content_id)
        if since <= current and current - since <= reset_after:
            changes = store.changes_since(content_id, since, limit)
            cursor = changes[-1].seq if changes else since
            return encode_page(content_id, changes, cursor, poll_after_ms=poll_after_ms)
    latest, cursor = store.latest(content_id, limit)
    return encode_page(
        content_id, latest, cursor, poll_after_ms=poll_after_ms, reset=since is not None
    )
