"""The per-author posting limit, kept in the database so that it holds
across every process and host.

``N/S`` is a token bucket per author: it holds N posts, each post takes
one, and they come back at N per S seconds. An author may post N times at
once, then once every S/N seconds; after S quiet seconds all N are back.

The bucket is one number per author, the moment it is full again (the
generic cell rate algorithm): a post at ``now`` moves it to
``max(full_at, now) + S/N``, and is allowed while that stays within S of
``now``. One upsert (:data:`TAKE_TOKEN`), in the post's own transaction,
checks and takes; its row lock orders one author's concurrent posts,
wherever they come from. It is the only text of the rule: a post's
transaction runs it (:meth:`PostLimit.take`), and the one-statement post
(:mod:`service.db.statements`) runs it as its first step.
"""

from __future__ import annotations

import sqlalchemy as sa

from .tables import author_limits

_US = 1_000_000

#: Take one token from the author's bucket, as SQL (``:name`` parameters,
#: :meth:`PostLimit.parameters`' values): a row with the author's id if
#: taken, none if refused (the bucket then stays as it was). Runs on
#: PostgreSQL and SQLite alike.
TAKE_TOKEN = """\
INSERT INTO author_limits (author_id, full_at_us) VALUES (:author_id, :next_us)
ON CONFLICT (author_id) DO UPDATE SET full_at_us = CASE
    WHEN author_limits.full_at_us > :now_us
    THEN author_limits.full_at_us + :interval_us ELSE :next_us END
WHERE author_limits.full_at_us <= :latest_us
RETURNING author_id"""

_TAKE = sa.text(TAKE_TOKEN)


class RateLimited(Exception):
    """The author has no post left; ``retry_after`` is whole seconds to wait."""

    def __init__(self, retry_after):
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


class PostLimit:
    """At most ``count`` posts at once, refilled at ``count`` per ``window`` seconds."""

    def __init__(self, count, window):
        self.count = count
        self.window = window
        self._window_us = round(window * _US)
        # Rounded down, so that a burst of exactly ``count`` fits a full
        # bucket; at least 1 µs, or the bucket would never fill.
        self._interval_us = max(1, self._window_us // count)

    def take(self, conn, author_id, now_us):
        """Take one post from the author's bucket in ``conn``'s transaction.

        Returns 0, or the whole seconds until the author may post again; a
        refusal changes nothing. ``now_us`` is the time in microseconds
        since the epoch.
        """
        taken = conn.execute(_TAKE, self.parameters(author_id, now_us)).first()
        if taken is not None:
            return 0
        return self.retry_after(conn, author_id, now_us)

    def parameters(self, author_id, now_us):
        """The values :data:`TAKE_TOKEN` is run with (here, or inside a
        post's one statement: :mod:`service.db.statements`)."""
        interval = self._interval_us
        return {
            "author_id": author_id,
            "now_us": now_us,
            "interval_us": interval,
            "next_us": now_us + interval,
            # The latest a bucket may be full at and still hold a token.
            "latest_us": now_us + self._window_us - interval,
        }

    def retry_after(self, conn, author_id, now_us):
        """Whole seconds until a refused author may post again; read right
        after the refusing upsert, which locked the row as it saw it."""
        full_at = conn.execute(
            sa.select(author_limits.c.full_at_us).where(author_limits.c.author_id == author_id)
        ).scalar_one()
        wait_us = full_at + self._interval_us - self._window_us - now_us
        return -(-wait_us // _US)

