"""Database transactions per second over a window, from PostgreSQL's pg_stat_database."""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa

QUERY = sa.text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d")


@dataclass
class Sample:
    t: float
    xacts: int


class TransactionCounter:
    """Commits + rollbacks of one database (the service's reads end in ROLLBACK).

    Counts every client of that database, not only the service. Read from the
    ``postgres`` database when it answers, so these reads are not counted
    themselves. PostgreSQL flushes backend statistics about once a second:
    measure over several seconds.
    """

    def __init__(self, url):
        url = sa.engine.make_url(url)
        self.database = url.database
        self._own = 0  # transactions of ours counted in each window
        self._engine = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT",
                                        connect_args={"connect_timeout": 5})
        try:
            self.read()
        except sa.exc.OperationalError:
            self._engine.dispose()
            self._engine = sa.create_engine(url, isolation_level="AUTOCOMMIT",
                                            connect_args={"connect_timeout": 5})
            self._own = 1

    def read(self):
        with self._engine.connect() as conn:
            xacts = conn.execute(QUERY, {"d": self.database}).scalar_one()
        return Sample(time.perf_counter(), int(xacts))

    def rate(self, start, end):
        return (end.xacts - start.xacts - self._own) / (end.t - start.t)

    def close(self):
        self._engine.dispose()
