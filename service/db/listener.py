"""One LISTEN connection per process: another process's write wakes our pollers.

Every change sends ``pg_notify(channel, "content_id:seq")`` in its
transaction (:func:`service.db.statements.notify`, run by
:class:`~service.db.store.Store`); PostgreSQL delivers it at commit to every
session listening on the channel. The :class:`Listener` thread turns each
into ``on_notify(content_id, seq)`` (the hub's ``notified``, which skips a
feed that has the seq already). A notification is a hint, never the data:
one sent while the listener is disconnected is lost, so ``on_state(False)``
puts the pollers back on their short interval and ``on_state(True)``, after
every (re)connect, has them all query at once.
"""

from __future__ import annotations

import logging
import os
import random
import select
import threading

import psycopg2

from ..common.retry import Backoff

logger = logging.getLogger(__name__)

#: First pause, in seconds, before reconnecting after a failure; it
#: doubles (with jitter) up to the ``poll_backoff_max`` setting. Short: a
#: restarted database is usually back within a second or two.
RECONNECT_MIN = 0.1
#: TCP keepalives on the LISTEN connection, which may sit silent for
#: hours: a database host that vanished without closing the connection is
#: noticed within about 11 s (5 s idle, then 3 probes 2 s apart).
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3}


def pg_connector(engine, *, connect_timeout):
    """A function opening an autocommit psycopg2 connection like ``engine``'s
    (host, database, user, ``options``, ``application_name``: all from its URL)."""
    args, params = engine.dialect.create_connect_args(engine.url)
    params = {**params, **KEEPALIVES, "connect_timeout": connect_timeout}

    def connect():
        conn = psycopg2.connect(*args, **params)
        conn.autocommit = True  # LISTEN takes effect at once, and no transaction idles
        return conn

    return connect


class Listener:
    """Listens on ``channel`` on a thread of its own until :meth:`stop`.

    ``connect()`` opens a DBAPI connection (see :func:`pg_connector`). On any
    database error the thread logs, reports ``on_state(False)``, backs off
    with jitter from ``RECONNECT_MIN`` to ``backoff_max`` seconds and
    connects again. The app that starts a listener stops and joins it.
    """

    def __init__(self, connect, channel, *, on_notify, on_state, backoff_max=5.0,
                 rng=random.random):
        self._connect = connect
        self._channel = channel
        self._on_notify = on_notify
        self._on_state = on_state
        self._backoff = Backoff(RECONNECT_MIN, backoff_max, rng=rng)
        self._stopping = threading.Event()
        # stop() writes here, so a thread waiting on the connection wakes at once.
        self._stop_read, self._stop_write = os.pipe()
        self._thread = None
        #: True while LISTEN is in effect.
        self.listening = False
        #: Successful connections so far (reconnects are this minus one).
        self.connections = 0

    def start(self):
        self._thread = threading.Thread(target=self._run, name="livecomments-listener",
                                        daemon=True)
        self._thread.start()

    def stop(self):
        """Ask the thread to finish; :meth:`join` waits for it."""
        if not self._stopping.is_set():
            self._stopping.set()
            if self._stop_write >= 0:
                os.write(self._stop_write, b"x")

    def join(self, timeout=None):
        """Wait for the thread to end; True if it has (or never started)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        self._close_pipe()
        return True

    def _close_pipe(self):
        for fd in (self._stop_read, self._stop_write):
            try:
                os.close(fd)
            except OSError:
                pass  # closed by an earlier join
        self._stop_read = self._stop_write = -1

    def _run(self):
        while not self._stopping.is_set():
            conn = None
            try:
                conn = self._connect()
                with conn.cursor() as cursor:
                    cursor.execute(f'LISTEN "{self._channel}"')
            except psycopg2.Error as exc:
                _close(conn)
                delay = self._backoff.failed()
                logger.warning("LISTEN %s: cannot connect (%s); retrying in %.2f s",
                               self._channel, _first_line(exc), delay)
                self._stopping.wait(delay)
                continue
            self._backoff.succeeded()
            self.connections += 1
            logger.info("LISTEN %s: connected", self._channel)
            try:
                self._report(True)  # after LISTEN: what commits from now on is heard
                self._listen(conn)
            except psycopg2.Error as exc:
                logger.warning("LISTEN %s: connection lost (%s)", self._channel,
                               _first_line(exc))
            except Exception:
                # One bad notification must not end the listening for good.
                logger.exception("LISTEN %s: listener failed", self._channel)
            finally:
                _close(conn)
                if not self._stopping.is_set():
                    self._report(False)

    def _report(self, up):
        self.listening = up
        try:
            self._on_state(up)
        except Exception:
            logger.exception("LISTEN %s: on_state(%s) failed", self._channel, up)

    def _listen(self, conn):
        # poll(), not select(): select() fails on descriptors past 1,024,
        # and a busy server's database connection can well be one.
        waiter = select.poll()
        waiter.register(conn.fileno(), select.POLLIN)
        waiter.register(self._stop_read, select.POLLIN)
        while not self._stopping.is_set():
            waiter.poll()
            conn.poll()  # reads what arrived; raises if the connection died
            while conn.notifies:
                self._dispatch(conn.notifies.pop(0).payload)

    def _dispatch(self, payload):
        # "content_id:seq" (a bare content_id from writers before the seq was sent).
        content, _, seq = payload.partition(":")
        try:
            content_id, seq = int(content), int(seq) if seq else None
        except ValueError:
            logger.warning("LISTEN %s: ignoring payload %r", self._channel, payload[:100])
            return
        if seq is None:
            self._on_notify(content_id)
        else:
            self._on_notify(content_id, seq)


def _close(conn):
    if conn is not None:
        try:
            conn.close()
        except psycopg2.Error:
            pass  # already broken: closing is all that was left to do


def _first_line(exc):
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
