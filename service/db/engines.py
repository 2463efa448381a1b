"""Database engines tuned for this service: PostgreSQL and SQLite."""

from __future__ import annotations

import contextlib
import select
import sqlite3

import psycopg2
import psycopg2.extensions
import sqlalchemy as sa

from ..common.errors import StoreUnavailable

#: Seconds a SQLite writer waits for the file's write lock. Writers queue
#: on it one at a time; each holds it for milliseconds, so only a stuck
#: process makes anyone wait this long.
SQLITE_BUSY_TIMEOUT = 30

#: What a database error may be: SQLAlchemy's, or a driver's own, which can
#: escape SQLAlchemy (a pool resetting a connection the server closed).
#: The store turns each into :class:`~service.common.errors.StoreUnavailable`
#: (:func:`unavailable`), so no layer above ``db`` sees any of them.
DATABASE_ERRORS = (sa.exc.SQLAlchemyError, psycopg2.Error, sqlite3.Error)


def unavailable(exc):
    """``exc`` (one of :data:`DATABASE_ERRORS`) as the store's
    :class:`~service.common.errors.StoreUnavailable`: the first line of its
    message (raise it ``from exc`` to keep the rest)."""
    lines = str(exc).strip().splitlines()
    return StoreUnavailable(lines[0] if lines else type(exc).__name__)


def create_engine(url, *, pool_size=10, max_overflow=50, connect_timeout=5,
                  statement_timeout=10.0, autocommit=False):
    """Make an engine tuned for this service's use of each database.

    ``autocommit`` (PostgreSQL): every statement its own transaction, set
    once per connection rather than switched at each checkout.
    """
    if url.startswith("sqlite"):
        if sa.engine.make_url(url).database in (None, "", ":memory:"):
            # One in-memory database is one connection, shared by all threads.
            pool = {"poolclass": sa.pool.StaticPool}
        else:
            pool = {"pool_size": pool_size, "max_overflow": max_overflow}
        engine = sa.create_engine(
            url, **pool,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT},
        )
        _serialise_sqlite_writers(engine)
        return engine
    # Keep any libpq options the URL carries (a search_path, say).
    options = sa.engine.make_url(url).query.get("options", "")
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
        connect_args={
            "connect_timeout": connect_timeout,
            "options": f"{options} -c statement_timeout={int(statement_timeout * 1000)}".strip(),
        },
    )
    _drop_dead_connections(engine)
    return engine


@contextlib.contextmanager
def raw_cursor(engine):
    """A cursor of a pooled DBAPI connection in autocommit (PostgreSQL), for
    statements the store sends as they are, a transaction's ``BEGIN`` and
    ``COMMIT`` included (:func:`service.db.statements.quick_post`).

    The hottest statements (a post's) are sent this way: SQLAlchemy's
    Connection and result objects cost about a tenth of a post's CPU. A
    connection of a pool that is not in autocommit is switched for the
    while. Driver errors come out as SQLAlchemy's would: a
    :class:`~sqlalchemy.exc.DBAPIError`, the pooled connection invalidated
    when the database went away. A connection left inside a transaction (an
    error, or a refusal, between ``BEGIN`` and its end) is never pooled
    again: the driver, in autocommit, would not roll it back.
    """
    dbapi = engine.dialect.loaded_dbapi
    conn = engine.raw_connection()
    switched = False
    try:
        if not conn.dbapi_connection.autocommit:
            conn.dbapi_connection.autocommit = switched = True
        cursor = conn.cursor()
        try:
            yield cursor
        except dbapi.Error as exc:
            gone = engine.dialect.is_disconnect(exc, conn.dbapi_connection, cursor)
            if gone:
                conn.invalidate(exc)
            raise sa.exc.DBAPIError.instance(
                None, None, exc, dbapi.Error,
                connection_invalidated=gone, dialect=engine.dialect,
            ) from exc
        finally:
            if not cursor.closed:
                cursor.close()
    finally:
        raw = conn.dbapi_connection
        if raw is not None and not raw.closed:
            if raw.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                conn.invalidate()
            elif switched:
                raw.autocommit = False
        conn.close()


def _drop_dead_connections(engine):
    """Replace a pooled connection the server has closed, without a round trip.

    A restarted database (or pg_terminate_backend) leaves dead connections
    in the pool. ``pool_pre_ping`` would find them with a query on every
    checkout; an idle connection has nothing to read unless its server
    said goodbye and closed it, so a readable socket is a dead one: the
    pool makes a new connection instead. A connection dying after this
    check fails its statement, which Store._run runs again once.
    """

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection, record, _proxy):
        poller = record.info.get("poll")
        if poller is None:
            poller = record.info["poll"] = select.poll()
            poller.register(dbapi_connection.fileno(), select.POLLIN | select.POLLHUP)
        if poller.poll(0):
            raise sa.exc.DisconnectionError("the server closed this connection")


def _serialise_sqlite_writers(engine):
    """Take SQLite's write lock at BEGIN for writes, and read in WAL mode.

    pysqlite's own transaction handling begins lazily, so two writers that
    both read first deadlock on the lock upgrade; BEGIN IMMEDIATE waits
    (busy timeout) instead. WAL lets readers run beside the writer.
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT * 1000}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        write = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
