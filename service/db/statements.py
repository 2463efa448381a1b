"""The SQL of a change, each rule written once for every path that runs it.

Every change takes its content's next seq (:func:`next_seq`) and, with a
NOTIFY channel, sends ``content_id:seq`` (:func:`notify`); a post with a
limit first takes a token from its author's bucket
(:data:`~service.db.limits.TAKE_TOKEN`). The store runs these texts one by
one in a transaction (SQLite; keyed posts, deletions and refusals on
PostgreSQL), and a keyless post on PostgreSQL as one statement built from
the very same texts (:func:`one_statement_post`).

The one statement chains them by data-modifying CTEs and runs in
autocommit: one round trip and one implicit transaction instead of BEGIN,
three statements and COMMIT (measured, a quarter of the CPU per post).
Nothing changes in what is guaranteed: the statement is atomic, and the seq
row stays locked until it commits, so seq order is still commit order. A
refused token leaves the rest empty: nothing is stored, and the store
answers the refusal on the transaction's path. ``pg_notify`` runs in its
RETURNING clause: only for a comment stored, delivered at its commit like
the transaction's. SQLite has no data-modifying CTEs: it posts in a
transaction only.
"""

from __future__ import annotations

import sqlalchemy as sa

from .limits import TAKE_TOKEN


def next_seq(rows="VALUES (:content_id, 1)"):
    """The upsert that takes a content's next seq, answering ``last_seq``;
    the content's row comes from ``rows`` (SQL: ``VALUES``, or a
    ``SELECT``). Its row lock is held to commit: the next writer of the
    content waits on it, so seq order is commit order."""
    return (f"INSERT INTO content_seqs (content_id, last_seq) {rows}\n"
            "ON CONFLICT (content_id) DO UPDATE SET last_seq = content_seqs.last_seq + 1\n"
            "RETURNING last_seq")


def notify(content_id, seq):
    """``pg_notify`` of a change of ``content_id`` (SQL) to ``seq`` (SQL), on
    the channel ``:channel``: the payload ``content_id:seq``, which tells
    a process whose feed has the seq already that it need not query.
    :class:`~service.db.listener.Listener` reads it."""
    return f"pg_notify(:channel, CAST({content_id} AS text) || ':' || CAST({seq} AS text))"


#: A change's next seq, on its own (``:content_id``).
NEXT_SEQ = sa.text(next_seq())
#: A change's NOTIFY, on its own (``:channel``, ``:content_id``, ``:seq``).
NOTIFY = sa.text(f"SELECT {notify(':content_id', ':seq')}")

#: The comment, at the seq the ``next`` CTE took (the rest is what was sent).
_INSERT_COMMENT = """\
INSERT INTO comments (content_id, author_id, body, created_at, seq, deleted)
SELECT :content_id, :author_id, :body, :created_at, last_seq, false FROM next
RETURNING id, seq"""


def one_statement_post(dialect, *, limited, notifying):
    """The keyless post as one statement (PostgreSQL), in ``dialect``'s own
    parameter style, to run on a DBAPI cursor in autocommit. Its
    parameters: ``content_id``, ``author_id``, ``body``, ``created_at``;
    with ``limited``, :meth:`~service.db.limits.PostLimit.parameters`';
    with ``notifying``, ``channel``. It answers one row (id, seq, then
    pg_notify's void when notifying), or none if the limit refused it
    (then nothing is stored). Built once per store, not per post."""
    if limited:
        # The seq only if a token was taken.
        seq = next_seq("SELECT :content_id, 1 FROM taken")
        ctes = f"taken AS (\n{TAKE_TOKEN}\n), next AS (\n{seq}\n)"
    else:
        ctes = f"next AS (\n{next_seq()}\n)"
    sql = f"WITH {ctes}\n{_INSERT_COMMENT}"
    if notifying:
        sql += f", {notify('content_id', 'seq')}"
    return str(sa.text(sql).compile(dialect=dialect))
