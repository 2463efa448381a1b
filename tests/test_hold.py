"""The long-poll hold on a real waitress server, over real sockets, on SQLite
and PostgreSQL.

Many concurrent viewers are raw sockets multiplexed with ``selectors`` (one
test thread, not one thread per viewer; the client is ``rawhttp``). "Another process" is a second
:class:`~service.db.store.Store` with an engine of its own writing to the same
database (what another waitress process does), or a real subprocess.
Tests assert what is delivered, to whom and by what (a wake, a poll, a
timeout); the latencies they print (``pytest -s`` shows them) are for
reading, not asserted: the bench (``python -m scripts.bench``) measures them.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rawhttp import Exchange, collect

CONTENT = 42
AUTHOR = 5
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clients():
    """``clients(port, n)``: n connections, all closed after the test."""
    made = []

    def make(port, n=1):
        new = [Exchange(port) for _ in range(n)]
        made.extend(new)
        return new

    yield make
    for x in made:
        x.close()


def feed_path(since=None, wait=None, content_id=CONTENT, **params):
    query = {"since": since, "wait": wait, **params}
    args = "&".join(f"{k}={v}" for k, v in query.items() if v is not None)
    return f"/contents/{content_id}/comments" + (f"?{args}" if args else "")


def hold(clients, port, n, since, wait=20, content_id=CONTENT):
    return [x.send(feed_path(since, wait, content_id)) for x in clients(port, n)]


def request(port, method, path, *, body=None, headers=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = dict(headers or {})
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def post_comment(port, auth, body, content_id=CONTENT, parent_id=None):
    document = {"body": body} if parent_id is None else {"body": body, "parent_id": parent_id}
    status, comment = request(
        port, "POST", f"/contents/{content_id}/comments", body=document,
        headers={"Authorization": auth},
    )
    assert status == 201, comment
    return comment


def latest_cursor(port, content_id=CONTENT):
    status, page = request(port, "GET", feed_path(content_id=content_id))
    assert status == 200
    return page["cursor"]


def wait_for(predicate, timeout, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, (
            f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.005)


def waiting(hub):
    """Waiters registered in ``hub``'s feeds: a hold takes its slot first and
    registers a moment later (in each feed it names), and a change in
    between answers it at once, as a catch-up."""
    return sum(poller.feed.held for poller in hub.pollers())


def wait_held(app, count, timeout=15):
    """Until ``count`` holds have their slots and wait in their feeds."""
    wait_for(lambda: app.hub.budget.held == count and waiting(app.hub) >= count, timeout,
             lambda: f"{count} held requests (have {app.hub.budget.held} slots, "
                     f"{waiting(app.hub)} waiting in feeds)")


def assert_delivered(exchanges, comment):
    for x in exchanges:
        assert x.response is not None, "viewer got no answer"
        assert x.response.status == 200, x.response
        page = x.response.json
        assert [c["id"] for c in page["comments"]] == [comment["id"]], page
        assert page["cursor"] == comment["seq"]


def assert_empty_at(exchange, cursor):
    assert exchange.response is not None, "no answer"
    assert exchange.response.status == 200, exchange.response
    page = exchange.response.json
    assert page["comments"] == [] and page["cursor"] == cursor, page
    return page


def report(name, samples):
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print(f"\nMEASURED {name}: n={len(samples)} median={statistics.median(samples) * 1000:.1f} ms "
          f"p99={p99 * 1000:.1f} ms max={samples[-1] * 1000:.1f} ms")


# -- delivery latency ----------------------------------------------------------


def test_held_request_is_woken_by_a_local_post_not_by_a_poll(make_server, make_app, clients,
                                                            token):
    # A 30 s poll interval and no NOTIFY: an answer within the 10 s the
    # test waits can only come from the POST waking the content's poller,
    # not from its periodic query.
    app = make_app(poll_interval=30, notify=False)
    port = make_server(app).adj.port
    cursor = latest_cursor(port)
    latencies = []
    for round_ in range(5):
        viewers = hold(clients, port, 3, cursor, wait=10)
        wait_held(app, 3)
        started = time.monotonic()
        comment = post_comment(port, token(AUTHOR), f"local {round_}")
        assert not collect(viewers, timeout=10), "the POST did not wake its viewers"
        assert_delivered(viewers, comment)
        latencies.extend(x.done_at - started for x in viewers)
        cursor = comment["seq"]
    report("latency after local POST (from sending the POST)", latencies)
    assert app.hub.status()["answers"]["woken"] == 15


WRITE_IN_SUBPROCESS = """
import sys
from service.db.store import Store, create_engine
store = Store(create_engine(sys.argv[1]))
print(store.add_comment(int(sys.argv[2]), 9, "from another process").seq)
store.dispose()
"""


def test_held_request_gets_another_process_commit_by_polling(
        make_server, make_app, make_store, database_url, clients):
    interval = 0.3
    # Polling alone (the backstop when NOTIFY is off or lost): test_notify.py
    # has the instant cross-process wake.
    app = make_app(poll_interval=interval, notify=False)
    port = make_server(app).adj.port
    other = make_store(database_url)  # an engine of its own: another process's view
    cursor = latest_cursor(port)
    latencies = []

    # Once through a real second process...
    viewers = hold(clients, port, 2, cursor, wait=20)
    wait_held(app, 2)
    written = subprocess.run(
        [sys.executable, "-c", WRITE_IN_SUBPROCESS, database_url, str(CONTENT)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )
    committed = time.monotonic()
    assert written.returncode == 0, written.stderr
    assert not collect(viewers, timeout=10)
    cursor = int(written.stdout)
    for x in viewers:
        assert x.response.json["cursor"] == cursor
        assert [c["body"] for c in x.response.json["comments"]] == ["from another process"]
    subprocess_latency = max(x.done_at for x in viewers) - committed
    latencies.append(subprocess_latency)

    # ...then several times through a second engine. Each commit lands just
    # after the poll that delivered the previous one: a full interval, the
    # worst case. Nothing wakes the poller (no NOTIFY, no local write): its
    # periodic query finds each commit, long before the viewers' 20 s wait.
    for round_ in range(6):
        viewers = hold(clients, port, 2, cursor, wait=20)
        wait_held(app, 2)
        comment = other.add_comment(CONTENT, 9, f"elsewhere {round_}")
        committed = time.monotonic()
        assert not collect(viewers, timeout=10)
        assert_delivered(viewers, comment.to_json())
        latencies.extend(x.done_at - committed for x in viewers)
        cursor = comment.seq
    report(f"latency after another process's commit (poll interval {interval * 1000:.0f} ms)",
           latencies)
    answers = app.hub.status()["answers"]
    assert answers["woken"] == 14 and answers["timeout"] == 0, answers


# -- timeouts, short polls, Prefer, HTTP versions ------------------------------


def test_timeouts_answer_200_empty_at_the_same_cursor(make_server, make_app, make_store,
                                                      database_url, clients, monkeypatch):
    app = make_app(poll_interval=0.1, max_wait=2, default_wait=1)
    port = make_server(app).adj.port
    waits = []  # the wait of each hub read, as the server took it from the request
    read = app.hub.read

    def reading(query, *args, **kwargs):
        waits.append(query.wait)
        return read(query, *args, **kwargs)

    monkeypatch.setattr(app.hub, "read", reading)
    other = make_store(database_url)
    for n in range(2):
        other.add_comment(CONTENT, 9, f"c{n}")
    cursor = latest_cursor(port)
    assert cursor == 2

    cases = {
        # name: (target, headers, HTTP version, expected seconds, Preference-Applied)
        "wait=1": (feed_path(cursor, 1), {}, "HTTP/1.1", 1, None),
        "HTTP/1.0": (feed_path(cursor, 1), {}, "HTTP/1.0", 1, None),
        "query form": (f"/comments?content_id={CONTENT}&since={cursor}&wait=1", {},
                       "HTTP/1.1", 1, None),
        "default wait": (feed_path(cursor), {}, "HTTP/1.1", 1, None),
        "wait capped": (feed_path(cursor, 100), {}, "HTTP/1.1", 2, None),
        "Prefer": (feed_path(cursor), {"Prefer": "wait=1"}, "HTTP/1.1", 1, "wait=1"),
        "Prefer capped": (feed_path(cursor), {"Prefer": "respond-async, wait=100"},
                          "HTTP/1.1", 2, "wait=2"),
        "wait=0": (feed_path(cursor, 0), {}, "HTTP/1.1", 0, None),
    }
    exchanges = {}
    waits.clear()
    for name, (target, headers, version, _, _) in cases.items():
        (exchanges[name],) = clients(port)
        exchanges[name].send(target, headers=headers, version=version)
    # Each held its wait, capped: none is held anything like 100 s.
    assert not collect(exchanges.values(), timeout=10)
    assert sorted(waits) == sorted(seconds for _, _, _, seconds, _ in cases.values())
    answers = app.hub.status()["answers"]
    assert (answers["timeout"], answers["empty"]) == (len(cases) - 1, 1), answers

    for name, (_, _, version, seconds, applied) in cases.items():
        x = exchanges[name]
        page = assert_empty_at(x, cursor)
        assert page["poll_after_ms"] == 0, name
        assert x.response.version == version, name
        assert int(x.response.headers["content-length"]) == len(x.response.body), name
        assert "transfer-encoding" not in x.response.headers, name
        assert x.response.headers["cache-control"] == "no-store", name
        assert x.response.headers.get("preference-applied") == applied, name
        # Held at least its wait (timeouts are answered by the poller's next
        # pass); wait=0 is never held (the one "empty" answer above).
        assert x.elapsed >= seconds - 0.05, (name, x.elapsed)
    assert app.hub.budget.held == 0

    # HTTP/1.1 keeps the connection for the next poll; HTTP/1.0 closes it.
    kept = exchanges["wait=1"].send(feed_path(cursor, 0))
    assert not collect([kept], timeout=10)
    assert_empty_at(kept, cursor)
    assert exchanges["HTTP/1.0"].hung_up(timeout=10)


def test_a_timeout_is_answered_when_the_wait_runs_out_not_at_the_next_pass(
        make_server, make_app, clients):
    """With passes 30 s apart, holds of 1 and 2 s (single and several feeds)
    end with their waits: the poller wakes for a deadline, not a tick."""
    app = make_app(poll_interval=30.0, max_wait=60)
    port = make_server(app).adj.port
    cursor = latest_cursor(port)
    targets = [feed_path(cursor, 1), feed_path(cursor, 2),
               f"/comments?feeds={CONTENT}:{cursor},{CONTENT + 1}:0&wait=1"]
    exchanges = clients(port, len(targets))
    for x, target in zip(exchanges, targets, strict=True):
        x.send(target)
    assert not collect(exchanges, timeout=20)  # the old pass would come after 30 s
    for x, wait in zip(exchanges, (1, 2, 1), strict=True):
        assert x.response.status == 200
        print(f"\nMEASURED wait={wait} answered after {x.elapsed:.3f} s")
        assert x.elapsed >= wait - 0.05
        assert x.elapsed < 20
    # Those wakes answer timeouts from memory: no query.
    queries = app.store.feed_queries
    again = clients(port, 1)
    again[0].send(feed_path(cursor, 1))
    assert not collect(again, timeout=20)
    assert app.store.feed_queries == queries


# -- many viewers --------------------------------------------------------------


def test_500_held_viewers_all_receive_a_new_comment(make_server, make_app, clients, token):
    app = make_app(threads=600, hold_budget=550, poll_interval=0.2, connection_limit=2000)
    port = make_server(app).adj.port
    cursor = latest_cursor(port)
    viewers = hold(clients, port, 500, cursor, wait=20)
    wait_held(app, 500)

    started = time.monotonic()
    comment = post_comment(port, token(AUTHOR), "to five hundred")
    unanswered = collect(viewers, timeout=10)
    assert not unanswered, f"{len(unanswered)} of 500 viewers got no answer"
    assert_delivered(viewers, comment)
    latencies = [x.done_at - started for x in viewers]
    report("500 held viewers, latency from sending the POST", latencies)
    assert app.hub.budget.held == 0
    assert app.hub.status()["answers"]["woken"] == 500  # each woken, none timed out
    # Every viewer at the same cursor got the same bytes.
    assert len({x.response.body for x in viewers}) == 1


def test_exhausted_hold_budget_sheds_long_polls_and_posts_still_answer(
        make_server, make_app, clients, token):
    # Eight threads, four holds. Without the budget the extra long-polls
    # would take the remaining threads for 10 s and the POST would queue.
    app = make_app(threads=8, hold_budget=4, poll_interval=0.2, shed_poll_after_ms=1500)
    port = make_server(app).adj.port
    cursor = latest_cursor(port)
    held = hold(clients, port, 4, cursor, wait=10)
    wait_held(app, 4)

    extra = hold(clients, port, 16, cursor, wait=10)
    started = time.monotonic()
    status, _ = request(port, "POST", "/contents/99/comments", body={"body": "still writable"},
                        headers={"Authorization": token(AUTHOR)})
    post_seconds = time.monotonic() - started
    assert status == 201
    # Answered while the four holds are still held (their 10 s wait): it
    # did not queue for a thread behind the extra long-polls.
    assert app.hub.budget.held == 4 and len(collect(held, timeout=0)) == 4
    status, health = request(port, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok"

    assert not collect(extra, timeout=5)
    for x in extra:  # shed at once, not held: asked to come back later
        page = assert_empty_at(x, cursor)
        assert page["poll_after_ms"] == 1500
    assert app.hub.status()["answers"]["shed"] == 16
    print(f"\nMEASURED POST with the hold budget exhausted: {post_seconds * 1000:.1f} ms")
    assert app.hub.budget.held == 4 and len(collect(held, timeout=0)) == 4

    comment = post_comment(port, token(AUTHOR), "to the four")
    assert not collect(held, timeout=3)
    assert_delivered(held, comment)


def test_viewers_that_disconnect_free_their_slots(make_server, make_app, clients, token):
    interval = 0.2
    app = make_app(threads=130, hold_budget=100, poll_interval=interval)
    port = make_server(app).adj.port
    cursor = latest_cursor(port)
    gone = hold(clients, port, 100, cursor, wait=20)
    wait_held(app, 100)
    (shed,) = hold(clients, port, 1, cursor, wait=20)
    assert not collect([shed], timeout=1)
    assert shed.response.json["poll_after_ms"] > 0  # the budget is full

    for x in gone:
        x.close()
    closed = time.monotonic()
    # Freed once the poller notices, long before their 20 s wait runs out.
    wait_for(lambda: app.hub.budget.held == 0, 10, "slots of vanished viewers to be freed")
    freed = time.monotonic() - closed
    print(f"\nMEASURED slots of 100 vanished viewers freed after {freed * 1000:.0f} ms")
    assert app.hub.status()["answers"]["timeout"] == 100  # answered as they left

    # New viewers are held again (not shed), and get the next comment.
    viewers = hold(clients, port, 100, cursor, wait=20)
    wait_held(app, 100)
    assert len(collect(viewers, timeout=0.3)) == 100
    comment = post_comment(port, token(AUTHOR), "to the newcomers")
    assert not collect(viewers, timeout=5)
    assert_delivered(viewers, comment)


# -- database trouble and restarts ---------------------------------------------


def rename_comments_table(store, old, new):
    with store.engine.execution_options(write=True).begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")


def test_poller_survives_database_errors_and_viewers_never_see_5xx(
        make_server, make_app, make_store, database_url, clients):
    # Queries every 0.1 s even while NOTIFY is heard, so they meet the error.
    app = make_app(poll_interval=0.1, notify_poll_interval=0.1)
    port = make_server(app).adj.port
    other = make_store(database_url)
    cursor = other.add_comment(CONTENT, 9, "before").seq
    assert latest_cursor(port) == cursor
    (poller,) = app.hub.pollers()
    viewers = hold(clients, port, 3, cursor, wait=1)
    wait_held(app, 3)

    # Every feed query now fails with a real database error.
    rename_comments_table(other, "comments", "comments_away")
    try:
        wait_for(lambda: poller.failures >= 2, 3, "the poller to meet the error")
        assert not collect(viewers, timeout=2)
        for x in viewers:
            assert_empty_at(x, cursor)  # a normal timeout: 200, same cursor
        # Viewers come back with the same cursor and are held from memory.
        again = [x.send(feed_path(cursor, 1)) for x in viewers]
        assert not collect(again, timeout=2)
        for x in again:
            assert_empty_at(x, cursor)
        assert poller.failures >= 3
    finally:
        rename_comments_table(other, "comments_away", "comments")
    comment = other.add_comment(CONTENT, 9, "after the outage")

    # The poller recovers (within its backoff, at most 5 s) and its cursor
    # did not move during the outage: the comment is delivered.
    resumed = [x.send(feed_path(cursor, 10)) for x in viewers]
    assert not collect(resumed, timeout=8)
    assert_delivered(resumed, comment.to_json())
    assert poller.failures == 0
    assert app.hub.pollers() == [poller]


def test_viewers_resume_after_a_server_restart(make_server, make_app, make_store,
                                               database_url, clients, token):
    other = make_store(database_url)
    first = make_app(poll_interval=0.2)
    server = make_server(first)
    cursor = other.add_comment(CONTENT, 9, "before the restart").seq
    viewers = hold(clients, server.adj.port, 3, cursor, wait=10)
    wait_held(first, 3)

    first.close()  # what SIGTERM does after the server stops listening
    server.shutdown()
    collect(viewers, timeout=3)
    for x in viewers:
        # Answered empty at its cursor, or cut off; never an error.
        assert x.eof or assert_empty_at(x, cursor)

    missed = [other.add_comment(CONTENT, 9, f"while down {n}") for n in range(2)]
    second = make_app(poll_interval=0.2)
    port = make_server(second).adj.port
    back = hold(clients, port, 3, cursor, wait=10)
    assert not collect(back, timeout=5)
    for x in back:
        assert x.response.status == 200
        page = x.response.json
        assert [c["id"] for c in page["comments"]] == [c.id for c in missed]
        assert page["cursor"] == missed[-1].seq
    # Missed changes come at once, not after a hold.
    assert second.hub.status()["answers"]["catch_up"] == 3
    assert second.hub.status()["answers"]["woken"] == 0

    viewers = hold(clients, port, 3, missed[-1].seq, wait=10)
    wait_held(second, 3)
    comment = post_comment(port, token(AUTHOR), "after the restart")
    assert not collect(viewers, timeout=3)
    assert_delivered(viewers, comment)


# -- catch-up, reset, tombstones -----------------------------------------------


def test_catch_up_reset_and_tombstones_over_http(make_server, make_app, make_store,
                                                 database_url, clients, token):
    app = make_app(poll_interval=0.2, feed_window=3, reset_after=5)
    port = make_server(app).adj.port
    other = make_store(database_url)
    written = [other.add_comment(CONTENT, AUTHOR, f"c{n}") for n in range(1, 9)]
    written[6] = other.get_comment(CONTENT, written[6].id)
    assert latest_cursor(port) == 8  # loads the feed: seqs 6, 7, 8 in memory

    (watcher,) = hold(clients, port, 1, 8, wait=10)
    wait_held(app, 1)
    secret = written[6]
    status, _ = request(port, "DELETE", f"/contents/{CONTENT}/comments/{secret.id}",
                        headers={"Authorization": token(AUTHOR)})
    assert status == 204
    assert not collect([watcher], timeout=3)
    (tombstone,) = watcher.response.json["comments"]
    assert (tombstone["id"], tombstone["seq"], tombstone["body"], tombstone["deleted"]) == (
        secret.id, 9, None, True)

    def get(**params):
        status, page = request(port, "GET", feed_path(**params))
        assert status == 200
        return page

    # In memory: the window no longer holds the deleted body.
    page = get(since=5, wait=0)
    assert [(c["seq"], c["body"]) for c in page["comments"]] == [
        (6, "c6"), (8, "c8"), (9, None)]
    assert page["cursor"] == 9 and page["reset"] is False
    # Older than the window: one store read, same rules.
    page = get(since=4)
    assert [(c["seq"], c["body"]) for c in page["comments"]] == [
        (5, "c5"), (6, "c6"), (8, "c8"), (9, None)]
    page = get(since=4, limit=2)
    assert [c["seq"] for c in page["comments"]] == [5, 6] and page["cursor"] == 6
    # More than reset_after behind: the latest page and the current cursor.
    page = get(since=3, limit=3)
    assert page["reset"] is True and page["cursor"] == 9
    assert [c["body"] for c in page["comments"]] == ["c5", "c6", "c8"]
    # Ahead of the database (it was replaced): reset too.
    page = get(since=500, wait=0)
    assert page["reset"] is True and page["cursor"] == 9
    # The latest page leaves the deleted comment out.
    page = get()
    assert "c7" not in [c["body"] for c in page["comments"]] and page["cursor"] == 9
    assert len(page["comments"]) == 7
