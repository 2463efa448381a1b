"""Instant cross-process wake on PostgreSQL: writers NOTIFY, each process LISTENs.

"Another process" is a second app with a store and engine of its own over
the same database. Poll intervals are 30 s, so a wake within a second can
only have come from a notification. Timing tests print what they measured
(``pytest -s`` shows it).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid

import psycopg2
import pytest
import sqlalchemy as sa
from conftest import PG_URL, make_settings, require_postgres, with_application_name
from fakes import FakeClock, FakeStore, hub_for
from test_hold import (
    AUTHOR,
    CONTENT,
    Exchange,
    collect,
    feed_path,
    latest_cursor,
    post_comment,
    report,
    request,
    wait_for,
    wait_held,
)

from service.app import create_app
from service.config.settings import Settings, SettingsError
from service.db import listener as listener_module
from service.db.idempotency import IdempotencyKey
from service.db.limits import PostLimit
from service.db.listener import Listener, pg_connector
from service.db.store import create_engine

SLOW_POLLS = {"poll_interval": 30, "notify_poll_interval": 30}

# -- settings ------------------------------------------------------------------


def test_notify_is_on_for_postgresql_and_off_for_sqlite():
    assert Settings.from_env(environ={"LIVECOMMENTS_DATABASE_URL": PG_URL}).notify is True
    assert Settings.from_env(environ={}).notify is False
    off = Settings.from_env(environ={"LIVECOMMENTS_DATABASE_URL": PG_URL,
                                     "LIVECOMMENTS_NOTIFY": "0"})
    assert off.notify is False


@pytest.mark.parametrize("overrides", [
    {"notify": "1"},  # SQLite has no LISTEN
    {"database_url": PG_URL, "notify_channel": "with-dash"},
    {"database_url": PG_URL, "notify_channel": "9lives"},
    {"database_url": PG_URL, "notify_channel": "x" * 64},
    {"notify_poll_interval": "0"},
    {"notify_poll_interval": "nan"},
])
def test_bad_notify_settings_are_refused(overrides):
    with pytest.raises(SettingsError):
        Settings.from_env(environ={}, **overrides)


# -- the interval rule, with a fake clock ----------------------------------------


def test_pollers_query_seldom_while_listening_and_every_pass_otherwise():
    store = FakeStore()
    clock = FakeClock()
    hub = hub_for(store, clock, poll_interval=0.5, notify_poll_interval=5)
    hub.listening(True)
    hub.feed(CONTENT)
    (poller,) = hub.pollers()

    def queries_in(ticks, step=0.5):
        before = store.calls["changes_since"]
        for _ in range(ticks):
            clock.advance(step)
            poller.tick()
        return store.calls["changes_since"] - before

    poller.tick()  # the first pass queries
    assert queries_in(9) == 0  # 4.5 s: not due
    assert queries_in(1) == 1  # 5 s
    hub.wake(CONTENT)  # a NOTIFY: at once, whatever the interval
    assert queries_in(1, step=0) == 1
    # Timeouts keep the short pass: a 2 s hold ends at 2 s, not at a query.
    waiter = poller.feed.hold(0, 50, deadline=clock.now + 2)
    queries_in(4)
    assert waiter.event.is_set()

    hub.listening(False)  # the listener lost its connection: poll at once...
    assert queries_in(1, step=0) == 1
    assert queries_in(4) == 4  # ...and on every pass again
    hub.listening(True)  # reconnected: one query at once for what was missed
    assert queries_in(1, step=0) == 1
    assert queries_in(4) == 0
    assert hub.status()["notify"] == "listening"


def test_a_new_poller_follows_the_listener_state():
    store = FakeStore()
    clock = FakeClock()
    hub = hub_for(store, clock, poll_interval=0.5, notify_poll_interval=5)
    assert hub.status()["notify"] == "off"
    hub.listening(True)
    hub.feed(CONTENT)
    (poller,) = hub.pollers()
    poller.tick()
    before = store.calls["changes_since"]
    clock.advance(1)
    poller.tick()
    assert store.calls["changes_since"] == before


# -- writers notify ------------------------------------------------------------------


@pytest.mark.postgres
def test_every_change_notifies_its_content_id_at_commit(make_store, pg_url):
    """One payload, ``content_id:seq``, whichever way the change was made:
    a post as one statement (with a limit or without), a post or a deletion
    in a transaction."""
    store = make_store(pg_url)
    engine = create_engine(PG_URL)
    conn = pg_connector(engine, connect_timeout=5)()
    try:
        with conn.cursor() as cursor:
            cursor.execute(f'LISTEN "{store.notify_channel}"')

        def heard():
            time.sleep(0.1)
            conn.poll()
            payloads = [n.payload for n in conn.notifies]
            conn.notifies.clear()
            return payloads

        comment = store.add_comment(31, 1, "hello")
        assert heard() == [f"31:{comment.seq}"]
        limited = store.post_comment(31, 1, "limited", limit=PostLimit(5, 10)).comment
        assert heard() == [f"31:{limited.seq}"]
        keyed = store.post_comment(31, 1, "keyed", key=IdempotencyKey("k", 60)).comment
        assert heard() == [f"31:{keyed.seq}"]
        tombstone = store.delete_comment(31, comment.id)
        assert heard() == [f"31:{tombstone.seq}"]
        store.delete_comment(31, comment.id)  # a tombstone again: no change
        assert heard() == []
        plain = make_store(pg_url, notify_channel=None)
        plain.add_comment(31, 1, "unannounced")
        assert heard() == []
    finally:
        conn.close()
        engine.dispose()


# -- the listener on a real PostgreSQL -----------------------------------------------


def notify(channel, payload):
    engine = sa.create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            conn.execute(sa.select(sa.func.pg_notify(channel, payload)))
    finally:
        engine.dispose()


@pytest.fixture
def channel():
    require_postgres()
    return f"lc_listen_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_listener():
    listeners = []

    def make(connect, channel, **kwargs):
        heard, states = [], []
        listener = Listener(connect, channel, on_notify=heard.append,
                            on_state=states.append, **kwargs)
        listener.start()
        listeners.append(listener)
        return listener, heard, states

    yield make
    for listener in listeners:
        listener.stop()
        listener.join(5)


@pytest.mark.postgres
def test_listener_passes_content_ids_on_and_stops_at_once(make_listener, channel):
    engine = create_engine(PG_URL)
    listener, heard, states = make_listener(pg_connector(engine, connect_timeout=5), channel)
    try:
        wait_for(lambda: listener.listening, 5, "LISTEN")
        assert states == [True]
        notify(channel, "not a number")  # ignored, and the listener carries on
        notify(channel, "17")
        notify(f"{channel}_other", "18")
        notify(channel, "19")  # heard after the others, which are behind it then
        wait_for(lambda: 19 in heard, 10, "the notifications")
        assert heard == [17, 19]
        listener.stop()
        # It waits on the connection with no timeout: only stop() ends the wait.
        assert listener.join(10)
        assert states == [True]  # stopping is not a lost connection
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_listener_backs_off_while_it_cannot_connect_and_stops_at_once(
        make_listener, channel, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger=listener_module.__name__)
    attempts = []

    def refused():
        attempts.append(time.monotonic())
        raise psycopg2.OperationalError("connection refused")

    def pauses():
        """The pauses the listeners logged, in seconds."""
        return [float(m[1]) for record in caplog.records
                if (m := re.search(r"retrying in ([0-9.]+) s", record.getMessage()))]

    listener, _, states = make_listener(refused, channel, backoff_max=0.4,
                                        rng=lambda: 1.0)
    wait_for(lambda: len(attempts) >= 5, 10, lambda: f"5 attempts, not {len(attempts)}")
    listener.stop()
    assert listener.join(10)
    # Doubling from 0.1 s up to backoff_max (rng() == 1: no jitter), each
    # waited out before the next attempt.
    delays = pauses()
    assert delays[:4] == [0.1, 0.2, 0.4, 0.4], delays
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert all(gap >= delay - 0.01 for gap, delay in zip(gaps, delays, strict=False)), gaps
    assert states == []

    # Stopped in the middle of a long pause, it stops at once: stop() ends the pause.
    monkeypatch.setattr(listener_module, "RECONNECT_MIN", 60)
    caplog.clear()
    stuck, _, _ = make_listener(refused, channel, backoff_max=60, rng=lambda: 1.0)
    wait_for(lambda: pauses() == [60.0], 10, lambda: f"a 60 s pause, not {pauses()}")
    stuck.stop()
    assert stuck.join(10), "stop() did not end a 60 s pause"


# -- two processes over one database ----------------------------------------------


def listening(*apps):
    wait_for(lambda: all(app.listener.listening for app in apps), 10, "LISTEN on every app")


@pytest.mark.postgres
def test_a_post_to_one_process_wakes_viewers_held_in_another_at_once(
        make_server, make_app_at, pg_url, token):
    writer = make_app_at(pg_url, **SLOW_POLLS)
    reader = make_app_at(pg_url, **SLOW_POLLS)
    writer_port = make_server(writer).adj.port
    reader_port = make_server(reader).adj.port
    listening(writer, reader)
    cursor = latest_cursor(reader_port)
    from_post, posting = [], []
    for round_ in range(50):
        viewer = Exchange(reader_port).send(feed_path(cursor, 20))
        try:
            wait_held(reader, 1)
            sent = time.monotonic()
            comment = post_comment(writer_port, token(AUTHOR), f"elsewhere {round_}")
            posting.append(time.monotonic() - sent)
            # 30 s poll intervals: a wake within the 10 s waited here is
            # the NOTIFY's, not a poll's.
            assert not collect([viewer], timeout=10), "the viewer was not woken"
        finally:
            viewer.close()
        page = viewer.response.json
        assert [c["id"] for c in page["comments"]] == [comment["id"]], page
        from_post.append(viewer.done_at - sent)
        cursor = comment["seq"]
    report("cross-process wake by NOTIFY (from sending the POST to the other process)",
           from_post)
    report("the POST itself (commit and NOTIFY included)", posting)
    assert reader.hub.notify_wakes >= 50


@pytest.mark.postgres
def test_the_listener_reconnects_and_polls_what_it_missed(
        make_server, make_app_at, make_store, pg_url, monkeypatch, kill_connections):
    name = f"lc_notify_{uuid.uuid4().hex[:12]}"
    # Reconnects retried every 0.5 s at most, so being let back is prompt.
    reader = make_app_at(with_application_name(pg_url, name), poll_backoff_max=0.5,
                         **SLOW_POLLS)
    port = make_server(reader).adj.port
    other = make_store(pg_url)
    listening(reader)
    cursor = latest_cursor(port)

    # Killed: the listener reconnects, and wakes work again.
    assert kill_connections(name, listening=True) == 1
    wait_for(lambda: reader.listener.connections == 2 and reader.listener.listening, 10,
             "the listener to reconnect")
    viewer = Exchange(port).send(feed_path(cursor, 20))
    wait_held(reader, 1)
    written = other.add_comment(CONTENT, 9, "after a reconnect")
    assert not collect([viewer], timeout=2), "no wake after the reconnect"
    assert viewer.response.json["cursor"] == written.seq
    viewer.close()
    cursor = written.seq

    # Killed and kept away: a comment written meanwhile is notified to
    # nobody; once back, the listener has every poller query at once.
    gate = threading.Event()
    connect = reader.listener._connect

    def gated():
        if not gate.is_set():
            raise psycopg2.OperationalError("kept away by the test")
        return connect()

    monkeypatch.setattr(reader.listener, "_connect", gated)
    viewer = Exchange(port).send(feed_path(cursor, 25))
    wait_held(reader, 1)
    (poller,) = reader.hub.pollers()
    killed_at = time.monotonic()
    assert kill_connections(name, listening=True) == 1
    wait_for(lambda: not reader.listener.listening, 5, "the listener to notice")
    status = latest_health(port)
    assert status["notify"] == "down"
    # The poll the lost connection triggers is done (a comment written
    # before it would be found by it).
    wait_for(lambda: poller.last_ok > killed_at and not poller._poked, 10,
             "the poll the lost connection triggers")
    missed = other.add_comment(CONTENT, 9, "while nobody listened")
    assert collect([viewer], timeout=1.0), "woken without a notification or a poll?"
    gate.set()
    reconnected = time.monotonic()
    assert not collect([viewer], timeout=5), "the reconnect did not poll"
    print(f"\nMEASURED missed notification delivered {viewer.done_at - reconnected:.3f} s "
          "after the listener was let back (backoff included)")
    assert viewer.response.json["cursor"] == missed.seq
    viewer.close()
    assert latest_health(port)["notify"] == "listening"


def latest_health(port):
    status, body = request(port, "GET", "/healthz")
    assert status == 200
    return body


def test_sqlite_has_no_listener(make_store, sqlite_url):
    app = create_app(make_settings(sqlite_url), store=make_store(sqlite_url))
    try:
        assert app.listener is None
        assert app.hub.status()["notify"] == "off"
    finally:
        app.close()
