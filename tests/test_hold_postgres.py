"""The hold on PostgreSQL alone: pollers that survive their connections
being killed, and database load that follows contents, not viewers."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import sqlalchemy as sa
import test_hold
from conftest import PG_URL, make_settings, require_postgres, with_application_name
from rawhttp import collect
from test_hold import (
    AUTHOR,
    CONTENT,
    assert_delivered,
    assert_empty_at,
    feed_path,
    hold,
    latest_cursor,
    request,
    wait_for,
    wait_held,
)

from service.app import create_app
from service.db.store import Store, create_engine

clients = test_hold.clients  # the raw-socket viewers fixture, shared


@pytest.mark.postgres
def test_poller_recovers_after_postgresql_connections_are_killed(
        make_server, make_app_at, make_store, pg_url, clients, token, kill_connections):
    # The app's connections carry an application_name of their own, so only
    # they are killed, whatever else runs on this PostgreSQL server.
    name = f"lc_hold_{uuid.uuid4().hex[:12]}"
    app = make_app_at(with_application_name(pg_url, name), poll_interval=0.2)
    port = make_server(app).adj.port
    other = make_store(pg_url)

    def kill():
        return kill_connections(name)

    cursor = other.add_comment(CONTENT, 9, "before").seq
    assert latest_cursor(port) == cursor
    delivered = timed_out = 0
    for round_ in range(3):
        viewers = hold(clients, port, 5, cursor, wait=2)
        wait_held(app, 5)
        assert kill() >= 1, "the app had no connection to kill"
        time.sleep(0.25)  # the poller meets the dead connection
        # ... and connects again; kill that one too.
        wait_for(lambda: kill() >= 1, timeout=10, what="the app to reconnect")
        comment = other.add_comment(CONTENT, 9, f"after kill {round_}")
        assert not collect(viewers, timeout=5)
        for x in viewers:
            assert x.response.status == 200, x.response
            if x.response.json["cursor"] == cursor:
                # Timed out during the trouble: empty, same cursor;
                # the next poll gets the comment.
                timed_out += 1
                assert x.response.json["comments"] == []
                x.send(feed_path(cursor, 5))
                assert not collect([x], timeout=6)
            else:
                delivered += 1
            assert_delivered([x], comment.to_json())
        cursor = comment.seq
    print(f"\nMEASURED after pg_terminate_backend: {delivered} viewers got the comment "
          f"in their hold, {timed_out} on their next poll")
    kill()
    # Writes through the app recover as well. The first may meet a
    # connection that died under it: a 503 with Retry-After, which a
    # client retries; the comment is then stored once (checked below).
    for _ in range(3):
        status, answer = request(port, "POST", f"/contents/{CONTENT}/comments",
                                 body={"body": "after the kills"},
                                 headers={"Authorization": token(AUTHOR)})
        if status != 503:
            break
        time.sleep(2)
    assert status == 201, answer
    comment = answer
    status, page = request(port, "GET", feed_path(cursor))
    assert status == 200 and page["comments"][0]["id"] == comment["id"]
    status, _ = request(port, "GET", "/healthz")
    assert status == 200


@pytest.fixture
def private_pg_database():
    """A PostgreSQL database of this test's own, so that its transaction
    counters (pg_stat_database) count nothing else; falls back to the test
    database if this role may not create one (CI runs nothing else there)."""
    require_postgres()
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"lc_hold_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.DBAPIError:
        name = None
    try:
        if name is None:
            url = sa.engine.make_url(PG_URL)
            yield url.render_as_string(hide_password=False), url.database, admin
        else:
            url = sa.engine.make_url(PG_URL).set(database=name)
            yield url.render_as_string(hide_password=False), name, admin
    finally:
        if name is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.mark.postgres
def test_database_queries_follow_contents_not_viewers(make_server, private_pg_database,
                                                      clients):
    """1 and 200 viewers held on one content through a whole hold cost the
    same database work per pass of the content's poller: one feed query a
    pass, none per viewer, counted by the store and by PostgreSQL.

    Counted per poller pass, not per second, so that how often the poller
    got to run (a loaded machine) does not matter. The counters are read
    with the poller parked between two passes and every backend of the app
    gone: the app's engine opens a connection per transaction (NullPool),
    and a backend flushes its pg_stat counters as it exits. PostgreSQL's
    transaction counts still stray by a couple between two readings (seen
    with autovacuum off and only the poller's statements run), hence their
    slack; 200 viewers costing a transaction each would be far beyond it.
    """
    url, datname, admin = private_pg_database
    store = Store(create_engine(url, pool_size=5))
    if not store.has_schema():
        store.create_schema()
    store.add_comment(CONTENT, 9, "one content")
    store.dispose()
    name = f"lc_queries_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(
        with_application_name(url, name), poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": 5, "options": "-c statement_timeout=10000"},
    )
    settings = make_settings(url, threads=260, hold_budget=220, poll_interval=0.25,
                             connection_limit=1000, max_wait=5, default_wait=5, notify=False)
    app = create_app(settings, store=Store(engine))
    try:
        port = make_server(app).adj.port
        cursor = latest_cursor(port)
        (poller,) = app.hub.pollers()
        passes, running, parked = [], threading.Event(), threading.Event()
        running.set()
        tick = poller.tick

        def counted_tick():
            if not running.is_set():  # parked between two passes
                parked.set()
                running.wait(30)
                parked.clear()
            passes.append(None)
            return tick()

        poller.tick = counted_tick  # the poller's thread calls it on its next pass

        def counters():
            """(feed queries, poller passes, transactions) with the poller
            parked and none of the app's backends left."""
            running.clear()
            try:
                assert parked.wait(10), "the poller did not come round"
                with admin.connect() as conn:
                    wait_for(lambda: not conn.execute(sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
                    ), {"name": name}).scalar_one(), 10, "the app's backends to exit")
                    conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
                    row = conn.execute(sa.text(
                        "SELECT xact_commit, xact_rollback FROM pg_stat_database "
                        "WHERE datname = :name"
                    ), {"name": datname}).one()
                return app.store.feed_queries, len(passes), row.xact_commit + row.xact_rollback
            finally:
                running.set()

        def through_a_hold(viewers):
            before = counters()
            held = hold(clients, port, viewers, cursor, wait=5)
            assert not collect(held, timeout=15)
            for x in held:  # timeouts, answered from memory
                assert_empty_at(x, cursor)
            after = counters()
            return [b - a for a, b in zip(before, after, strict=True)]

        one = through_a_hold(1)
        many = through_a_hold(200)
    finally:
        app.close()
    print(f"\nMEASURED 1 vs 200 held viewers through a 5 s hold: feed queries {one[0]} vs "
          f"{many[0]} in {one[1]} vs {many[1]} poller passes, transactions {one[2]} vs {many[2]}")
    for queries, passes_, transactions in (one, many):
        assert passes_ >= 1  # the poller answered the timeouts
        # One feed query a pass (no NOTIFY: every pass queries), none a viewer.
        assert queries == passes_, (one, many)
        # PostgreSQL saw each of them (reads run in autocommit: commits).
        assert transactions >= queries, (one, many)
    # As many transactions a pass with 200 viewers as with 1.
    per_pass = -(-one[2] // one[1])  # rounded up
    assert many[2] <= per_pass * many[1] + 10, (one, many)
