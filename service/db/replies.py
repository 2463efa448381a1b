"""Replies: a comment may name a parent, a comment of the same content.

A reply keeps a summary of its parent taken when it is posted (the
parent's author and the first :data:`EXCERPT_CHARS` characters of its
body), so that every answer carries it without a join and a reply's
representation is the same in every process and every cached page.
Deleting the parent clears the excerpt and sets ``parent_deleted`` on its
replies in the deletion's own transaction (:func:`scrub`): what is read
from the database afterwards no longer quotes a deleted comment. The
replies keep their seqs: the parent's tombstone is the change that tells
a client, and copies already sent (or pages already cached) are not sent
again.

A reply is posted in a transaction, never by the one-statement post: it
reads its parent after taking the content's seq, whose row lock also
orders the parent's deletion, so a reply and the deletion of its parent
are serialised and a reply never quotes a parent deleted before it.
"""

from __future__ import annotations

import sqlalchemy as sa

from .tables import comments

#: How much of the parent's body a reply quotes, in characters (code points).
EXCERPT_CHARS = 80


class ParentMissing(Exception):
    """The parent is no comment of this content."""


class ParentDeleted(Exception):
    """The parent is a tombstone: nothing to reply to."""


def excerpt(body):
    return None if body is None else body[:EXCERPT_CHARS]


def parent_summary(conn, content_id, parent_id):
    """The columns a reply to ``parent_id`` stores, read in ``conn``'s
    transaction (after the seq is taken). Raises :class:`ParentMissing` or
    :class:`ParentDeleted`."""
    row = conn.execute(
        sa.select(comments.c.author_id, comments.c.body, comments.c.deleted)
        .where(comments.c.id == parent_id, comments.c.content_id == content_id)
    ).one_or_none()
    if row is None:
        raise ParentMissing(parent_id)
    if row.deleted:
        raise ParentDeleted(parent_id)
    return {"parent_id": parent_id, "parent_author_id": row.author_id,
            "parent_excerpt": excerpt(row.body), "parent_deleted": False}


def scrub(conn, parent_id):
    """Clear the quoted excerpt from ``parent_id``'s replies (it is being deleted)."""
    conn.execute(
        comments.update()
        .where(comments.c.parent_id == parent_id)
        .values(parent_excerpt=None, parent_deleted=True)
    )
