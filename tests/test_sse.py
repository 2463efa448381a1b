"""Server-sent events on a real waitress server, over real sockets: framing
and flushing, resuming, the maximum duration, the stream cap and the hold
budget, vanished clients, encode-once, draining, and nginx in front."""

from __future__ import annotations

import threading
import time

import pytest
from components import BUFFERING, nginx
from sse_client import SSEClient
from test_hold import (
    AUTHOR,
    CONTENT,
    Exchange,
    assert_delivered,
    collect,
    hold,
    post_comment,
    request,
    wait_for,
    wait_held,
)

import service.web.sse

STREAM = f"/contents/{CONTENT}/comments/stream"


@pytest.fixture
def make_sqlite_app(make_app_at, sqlite_url):
    """Apps over SQLite only, for what does not depend on the database."""
    return lambda **overrides: make_app_at(sqlite_url, **overrides)


@pytest.fixture
def streams():
    """``streams(port, path=STREAM, **kwargs)``: SSE clients, closed after the test."""
    made = []

    def open_(port, path=STREAM, **kwargs):
        client = SSEClient(port, path, **kwargs)
        made.append(client)
        return client

    yield open_
    for client in made:
        client.close()


@pytest.fixture
def polls():
    """``polls(port, n)``: n long-poll connections, closed after the test."""
    made = []

    def make(port, n=1):
        new = [Exchange(port) for _ in range(n)]
        made.extend(new)
        return new

    yield make
    for x in made:
        x.close()


def open_stream(streams, port, path=STREAM, **kwargs):
    """A stream past its head and its first keep-alive; returns (client, first event)."""
    client = streams(port, path, **kwargs)
    assert client.head() == 200, client.headers
    first = client.next_event()
    assert first is not None and first.event == "keepalive", first
    return client, first


def delete(port, auth, comment_id):
    status, _ = request(port, "DELETE", f"/contents/{CONTENT}/comments/{comment_id}",
                        headers={"Authorization": auth})
    assert status == 204


# -- the wire -----------------------------------------------------------------


def test_stream_headers_and_one_flushed_event_per_change(make_server, make_sqlite_app,
                                                          streams, token):
    # A 30 s poll interval and 15 s between keep-alives: events within the
    # 10 s waited for each come from the writes waking the poller, each
    # flushed as it happens (not with the next keep-alive).
    app = make_sqlite_app(poll_interval=30.0)
    port = make_server(app).adj.port
    client, first = open_stream(streams, port, headers={"Accept-Encoding": "gzip"})
    headers = client.headers
    assert headers["content-type"] == "text/event-stream"
    assert headers["x-accel-buffering"] == "no"
    assert "no-cache" in headers["cache-control"]
    assert "content-encoding" not in headers and "content-length" not in headers
    assert headers["transfer-encoding"] == "chunked"
    # The first chunk: the reconnection hint, a comment line, and a keep-alive
    # that sets the browser's Last-Event-ID to the cursor it started at.
    assert client.first_chunk.startswith(b"retry: 2000\n: livecomments content")
    assert first.id == 0 and first.data == "0"
    assert app.hub.budget.held == 1 and app.hub.budget.streams == 1

    posted = []
    for n in range(3):
        sent = time.monotonic()
        posted.append(post_comment(port, token(AUTHOR), f"event {n}\nline two"))
        (event,) = client.events(1, timeout=10)
        print(f"\nMEASURED event {n} {time.monotonic() - sent:.3f} s after sending its POST")
        assert event.event == "comment" and event.id == posted[-1]["seq"]
        assert event.json == posted[-1]  # the feed's fields, the same values

    delete(port, token(AUTHOR), posted[0]["id"])
    (tombstone,) = client.events(1, timeout=3)
    assert tombstone.event == "tombstone"
    assert tombstone.json["id"] == posted[0]["id"]
    assert tombstone.json["deleted"] is True and tombstone.json["body"] is None
    assert app.hub.budget.held == 1


def test_stream_resumes_after_last_event_id_or_since(make_server, make_app, make_store,
                                                     database_url, streams, token):
    app = make_app(poll_interval=0.2)
    port = make_server(app).adj.port
    other = make_store(database_url)
    written = [other.add_comment(CONTENT, 9, f"c{n}") for n in range(5)]  # seq 1..5
    gone = other.delete_comment(CONTENT, written[1].id)  # seq 6; seq 2 is no more

    def replay(**kwargs):
        client, _ = open_stream(streams, port, **kwargs)
        events = client.events(3, timeout=5)
        client.close()
        return [(e.event, e.id, e.json["id"]) for e in events]

    expected = [("comment", 4, written[3].id), ("comment", 5, written[4].id),
                ("tombstone", 6, gone.id)]
    assert replay(headers={"Last-Event-ID": "3"}) == expected
    assert replay(path=STREAM + "?since=3") == expected
    # A reconnecting browser sends the URL it first used: the header wins.
    assert replay(path=STREAM + "?since=0", headers={"Last-Event-ID": "3"}) == expected

    # Neither: from now on, no history.
    client, first = open_stream(streams, port)
    assert first.id == 6
    comment = post_comment(port, token(AUTHOR), "after")
    (event,) = client.events(1, timeout=3)
    assert (event.id, event.json["id"]) == (comment["seq"], comment["id"])


def test_stream_ends_after_its_maximum_duration_and_resumes_without_loss(
        make_server, make_app, make_store, database_url, streams):
    app = make_app(poll_interval=0.1, sse_max_duration=1.5, sse_keepalive=1)
    port = make_server(app).adj.port
    other = make_store(database_url)
    written = []
    stop = threading.Event()

    def write():
        n = 0
        while not stop.wait(0.1):
            written.append(other.add_comment(CONTENT, 9, f"w{n}").seq)
            n += 1

    writer = threading.Thread(target=write)
    seen, ends, last_id = [], 0, 0
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while ends < 3:  # three streams the server ended, each resumed from the last
            assert time.monotonic() < deadline, f"{ends} streams ended"
            client = streams(port, headers={"Last-Event-ID": str(last_id)})
            assert client.head() == 200
            events = client.until_end(timeout=5)  # the server ends it
            ends += 1
            ids = [e.id for e in events if e.id is not None]
            last_id = ids[-1] if ids else last_id
            seen.extend(e.id for e in events if e.event == "comment")
            client.close()
    finally:
        stop.set()
        writer.join()
    # Catch up on the last writes.
    client = streams(port, headers={"Last-Event-ID": str(last_id)})
    assert client.head() == 200
    while not seen or seen[-1] < written[-1]:
        seen.extend(e.id for e in client.events(1, timeout=5))
    assert ends >= 3
    assert seen == written, "a change was lost or repeated across reconnections"


# -- threads, slots and the stream cap ------------------------------------------


def test_streams_have_a_cap_within_the_hold_budget(make_server, make_sqlite_app, streams,
                                                   polls, token):
    app = make_sqlite_app(threads=12, hold_budget=8, max_streams=2, poll_interval=0.2)
    port = make_server(app).adj.port
    first, _ = open_stream(streams, port)
    second, _ = open_stream(streams, port)

    refused = streams(port)
    assert refused.head() == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["content-type"] == "application/json"
    assert b"long-poll" in refused.body()
    budget = app.hub.budget
    assert (budget.held, budget.streams) == (2, 2)

    # Long-polls still get the rest of the budget, and writes a thread.
    held = hold(polls, port, 6, 0, wait=10)
    wait_held(app, 8)
    status, shed = request(port, "GET", f"/contents/{CONTENT}/comments?since=0&wait=10")
    assert status == 200 and shed["poll_after_ms"] > 0
    comment = post_comment(port, token(AUTHOR), "to everyone")
    for stream in (first, second):
        (event,) = stream.events(1, timeout=3)
        assert event.id == comment["seq"]
    assert not collect(held, timeout=3)
    assert_delivered(held, comment)
    # The waker freed the long-polls' slots, not the streams'.
    wait_held(app, 2)
    assert budget.streams == 2

    first.close()
    wait_for(lambda: budget.streams == 1, 5, "the closed stream to give its slot back")
    assert budget.held == 1
    again, _ = open_stream(streams, port)
    assert budget.streams == 2


def test_streaming_off_with_max_streams_0(make_server, make_sqlite_app, streams):
    app = make_sqlite_app(max_streams=0)
    client = streams(make_server(app).adj.port)
    assert client.head() == 503 and "retry-after" in client.headers


@pytest.mark.parametrize("notice", ["disconnect callback", "failed write"])
def test_a_vanished_client_frees_its_thread_and_slot(make_server, make_sqlite_app, streams,
                                                     notice):
    app = make_sqlite_app(sse_keepalive=2, poll_interval=0.2)
    served = app
    if notice == "failed write":
        # Without waitress's disconnect callback, the next keep-alive's
        # write fails instead.
        def served(environ, start_response):
            environ.pop("waitress.client_disconnected", None)
            return app(environ, start_response)
        served.settings = app.settings
    server = make_server(served)
    client, _ = open_stream(streams, server.adj.port)
    assert app.hub.budget.held == 1
    client.close()
    started = time.monotonic()
    # Long before the stream's 300 s end.
    wait_for(lambda: app.hub.budget.held == 0, 15, "the slot to be freed")
    wait_for(lambda: server.task_dispatcher.active_count == 0, 15, "the thread to be freed")
    print(f"\nMEASURED slot freed {time.monotonic() - started:.2f} s after the client left "
          f"({notice})")
    assert app.hub.budget.streams == 0


def test_each_event_is_encoded_once_per_change(make_server, make_sqlite_app, streams, token,
                                               monkeypatch):
    encoded = []
    real = service.web.sse.encode_event
    monkeypatch.setattr(service.web.sse, "encode_event",
                        lambda change: encoded.append(change.seq) or real(change))
    app = make_sqlite_app(poll_interval=0.2)
    port = make_server(app).adj.port
    first = post_comment(port, token(AUTHOR), "one")
    viewers = [open_stream(streams, port)[0] for _ in range(4)]
    behind = [open_stream(streams, port, path=STREAM + "?since=0")[0] for _ in range(2)]
    for client in behind:
        (event,) = client.events(1)
        assert event.id == first["seq"]
    second = post_comment(port, token(AUTHOR), "two")
    received = {client.events(1)[0].raw for client in viewers + behind}
    assert len(received) == 1  # the same bytes for every stream
    assert sorted(encoded) == [first["seq"], second["seq"]]


def test_draining_ends_streams_cleanly(make_server, make_sqlite_app, streams):
    app = make_sqlite_app()
    port = make_server(app).adj.port
    client, _ = open_stream(streams, port)
    app.close()
    client.until_end(timeout=5)
    assert client.ended
    refused = streams(port)
    assert refused.head() == 503
    # A browser resuming names a cursor: refused too, not a stream that
    # ends at once (which it would reconnect every retry, never falling back).
    resuming = streams(port, headers={"Last-Event-ID": "0"})
    assert resuming.head() == 503 and "retry-after" in resuming.headers


def test_stream_over_http_1_0(make_server, make_sqlite_app, streams, token):
    app = make_sqlite_app(sse_max_duration=1)
    port = make_server(app).adj.port
    client, _ = open_stream(streams, port, version="HTTP/1.0")
    assert "transfer-encoding" not in client.headers
    comment = post_comment(port, token(AUTHOR), "old client")
    (event,) = client.events(1, timeout=3)
    assert event.id == comment["seq"]
    client.until_end(timeout=5)  # the server closes the connection at the end
    assert client.eof


@pytest.mark.parametrize(("path", "headers"), [
    (STREAM, {"Last-Event-ID": "abc"}),
    (STREAM, {"Last-Event-ID": "-1"}),
    (STREAM + "?since=-1", {}),
    ("/contents/0/comments/stream", {}),
    ("/contents/x/comments/stream", {}),
])
def test_bad_stream_requests_are_refused(make_server, make_sqlite_app, streams, path, headers):
    app = make_sqlite_app()
    client = streams(make_server(app).adj.port, path, headers=headers)
    assert client.head() == 400
    assert app.hub.budget.held == 0


# -- behind nginx ----------------------------------------------------------------


@pytest.mark.slow
def test_stream_flows_through_a_default_nginx_proxy_pass(make_server, make_sqlite_app,
                                                         streams, token, tmp_path):
    app = make_sqlite_app(poll_interval=0.2)
    port = make_server(app).adj.port
    with nginx(tmp_path, port) as proxy_port, nginx(tmp_path, port, BUFFERING) as buffering:
        direct, _ = open_stream(streams, proxy_port)  # X-Accel-Buffering: no obeyed
        held_back = streams(buffering)
        comment = post_comment(port, token(AUTHOR), "through nginx")
        (event,) = direct.events(1, timeout=3)
        assert event.id == comment["seq"]
        # The same proxy told to ignore the header sits on the events.
        assert held_back.silent_for(2)
