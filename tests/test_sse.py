"""Server-sent events on a real waitress server, over real sockets: framing
and flushing, resuming, the maximum duration, the stream cap and the hold
budget, vanished clients, encode-once, draining, and nginx in front."""

from __future__ import annotations

import json
import threading
import time

import falcon
import falcon.testing
import pytest
from components import BUFFERING, nginx
from fakes import CONTENT as FAKE
from fakes import FakeStore, hub_for
from sse_client import Event, SSEClient
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
from service.web.sse import EventCache, EventStream, StreamResource

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
    """A stream past its head, the room it names first (``client.room``)
    and its first keep-alive; returns (client, the keep-alive)."""
    client = streams(port, path, **kwargs)
    assert client.head() == 200, client.headers
    room = client.next_event()
    assert room is not None and room.event == "room", room
    first = client.next_event()
    assert first is not None and first.event == "keepalive", first
    assert room.id == first.id  # the cursor the stream starts after
    client.room = room
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
        # Unnamed, so EventSource.onmessage gets it: an id and the data only.
        assert event.raw == f"id: {posted[-1]['seq']}\ndata: {event.data}".encode()
        assert event.event == "message" and event.id == posted[-1]["seq"]
        assert event.json == posted[-1]  # the feed's fields, the same values

    delete(port, token(AUTHOR), posted[0]["id"])
    (tombstone,) = client.events(1, timeout=3)
    assert tombstone.event == "message" and b"event:" not in tombstone.raw
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
        return [(e.event, e.id, e.json["id"], e.json["deleted"]) for e in events]

    expected = [("message", 4, written[3].id, False), ("message", 5, written[4].id, False),
                ("message", 6, gone.id, True)]
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
            seen.extend(e.id for e in events if e.event == "message")
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


def test_a_client_too_far_behind_gets_a_named_reset(make_server, make_sqlite_app, streams,
                                                    token):
    app = make_sqlite_app(poll_interval=0.2, reset_after=2)
    port = make_server(app).adj.port
    posted = [post_comment(port, token(AUTHOR), f"c{n}") for n in range(4)]
    client, first = open_stream(streams, port, headers={"Last-Event-ID": "1"})
    assert first.id == 1
    (reset,) = client.events(1)
    # Named: a plain EventSource's onmessage never mistakes it for a comment.
    assert reset.event == "reset" and reset.id == posted[-1]["seq"]
    assert reset.json["reset"] is True and reset.json["cursor"] == posted[-1]["seq"]
    assert [c["id"] for c in reset.json["comments"]] == [c["id"] for c in posted]
    after = post_comment(port, token(AUTHOR), "after the reset")
    (event,) = client.events(1, timeout=3)
    assert (event.event, event.id) == ("message", after["seq"])


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
    assert json.loads(refused.body())["code"] == "unavailable"
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


# -- the room and moderation events (a fake store, no server) ----------------------


def fake_app(store, **settings):
    """(falcon app serving the stream route alone, hub) over ``store``."""
    values = {"sse_keepalive": 0.2, "sse_max_duration": 30.0, "poll_interval": 0.02}
    values.update(settings)
    hub = hub_for(store, clock=time.monotonic, start_threads=True, **values)
    app = falcon.App()
    app.add_route("/contents/{content_id}/comments/stream",
                  StreamResource(hub, hub._settings))
    return app, hub


def blocks(body):
    """The events of a stream body (comment-only blocks dropped)."""
    events = [Event(block) for block in body.split(b"\n\n") if block]
    return [e for e in events if e.event is not None]


def named(events, *names):
    return [e for e in events if e.event in names]


def test_a_stream_names_the_room_on_connect_and_each_moderation_event():
    store = FakeStore()
    first = store.add("first")  # seq 1
    store.set_room(slow_mode_seconds=5, pinned=first)  # 2
    store.ban(3)  # 3
    store.unban(3)  # 4
    store.add("after")  # 5
    app, hub = fake_app(store, sse_max_duration=0.3)
    try:
        answer = falcon.testing.simulate_get(app, f"/contents/{FAKE}/comments/stream",
                                             headers={"Last-Event-ID": "0"})
    finally:
        hub.close()
    assert answer.status_code == 200
    events = [e for e in blocks(answer.content) if e.event != "keepalive"]
    room = {"closed": False, "slow_mode_seconds": 5, "pinned": first.to_json()}
    # On connect: the room as the feed knows it, with the cursor as id.
    assert (events[0].event, events[0].id, events[0].json) == ("room", 0, room)
    assert [(e.event, e.id) for e in events[1:]] == [
        ("message", 1), ("room", 2), ("ban", 3), ("unban", 4), ("message", 5)]
    assert events[2].json == room  # a room event's data is the room
    assert events[3].json == store.events[1].to_json() and events[3].json["author_id"] == 3
    assert events[4].json == store.events[2].to_json()
    assert hub.budget.held == 0 and hub.budget.streams == 0


def _streaming(app, count, results):
    """``count`` streams of the fake app, each on a thread appending its answer."""
    def run():
        results.append(falcon.testing.simulate_get(app, f"/contents/{FAKE}/comments/stream"))
    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_the_room_change_closing_a_content_ends_its_streams():
    store = FakeStore()
    store.add("one")
    app, hub = fake_app(store)
    results = []
    try:
        threads = _streaming(app, 3, results)
        feed = hub.feed(FAKE)
        wait_for(lambda: feed.held == 3, 5, "three streams held")
        closing = store.set_room(closed=True)
        for thread in threads:
            thread.join(5)
        assert not any(thread.is_alive() for thread in threads), "a stream did not end"
    finally:
        hub.close()
    closed = {"closed": True, "slow_mode_seconds": 0, "pinned": None}
    tails = set()
    for answer in results:
        events = blocks(answer.content)
        assert [(e.event, e.id) for e in events if e.event != "keepalive"] == [
            ("room", 1), ("room", closing.seq), ("closed", closing.seq)]
        assert events[-2].json == events[-1].json == closed
        assert events[-1].event == "closed"  # and then the end
        tails.add(answer.content[answer.content.index(b"id: 2\n"):])
    assert len(tails) == 1  # the same bytes for every stream
    assert hub.budget.held == 0 and hub.budget.streams == 0


def test_a_stream_of_a_closed_content_answers_204_and_keeps_no_slot():
    store = FakeStore()
    store.add("one")
    store.set_room(closed=True)
    app, hub = fake_app(store)
    try:
        for headers in ({}, {"Last-Event-ID": "0"}):
            answer = falcon.testing.simulate_get(app, f"/contents/{FAKE}/comments/stream",
                                                 headers=headers)
            assert answer.status_code == 204 and answer.content == b""
            assert hub.budget.held == 0 and hub.budget.streams == 0
        # Reopened: streams again, from the reopening on.
        store.set_room(closed=False)
        hub.feed(FAKE)
        (poller,) = hub.pollers()
        wait_for(lambda: not poller.feed.closed, 5, "the reopening")
        results = []
        (thread,) = _streaming(app, 1, results)
        wait_for(lambda: poller.feed.held == 1, 5, "the stream held")
        store.add("two")
        wait_for(lambda: poller.feed.last_seq == 4, 5, "the comment")
        hub.close()  # draining ends the stream
        thread.join(5)
    finally:
        hub.close()
    events = [e for e in blocks(results[0].content) if e.event != "keepalive"]
    assert [(e.event, e.id) for e in events] == [("room", 3), ("message", 4)]
    assert events[0].json["closed"] is False


def test_a_reset_of_a_closed_content_ends_the_stream():
    store = FakeStore()
    for n in range(5):
        store.add(f"c{n}")
    app, hub = fake_app(store, reset_after=2)
    try:
        hub.feed(FAKE)
        store.set_room(closed=True)  # seq 6
        (poller,) = hub.pollers()
        wait_for(lambda: poller.feed.closed, 5, "the closing")
        # A stream asked while the room was open (the check passed), now far behind.
        feed = poller.feed
        stream = EventStream(hub, EventCache(), FAKE, 1, hub._settings, disconnected=None,
                             clock=time.monotonic)
        chunks = list(stream)
        stream.close()
    finally:
        hub.close()
    assert feed.closed
    events = [e for e in blocks(b"".join(chunks)) if e.event != "keepalive"]
    assert [(e.event, e.id) for e in events] == [("room", 1), ("reset", 6), ("closed", 6)]
    assert events[1].json["room"]["closed"] is True and events[1].json["reset"] is True


# -- the room and moderation events, on a real server ------------------------------


def test_a_stream_follows_the_room_and_ends_when_the_content_closes(make_server, make_app,
                                                                     streams, token):
    # Pacing off: the moderation below comes faster than a chat's busy pace,
    # and this test reads each page's pause as the room's (test_pacing).
    app = make_app(poll_interval=0.1, busy_pace_ms=0)
    port = make_server(app).adj.port
    pinned = post_comment(port, token(AUTHOR), "read the rules")
    client, first = open_stream(streams, port)
    assert client.room.json == {"closed": False, "slow_mode_seconds": 0, "pinned": None}
    assert client.first_chunk.index(b"event: room") < client.first_chunk.index(b"keepalive")

    store = app.store
    room, slow = store.set_room(CONTENT, 99, slow_mode_seconds=10,
                                pinned_comment_id=pinned["id"])
    ban = store.ban(CONTENT, 7, seconds=60, reason="spam", moderator_id=99)
    lifted = store.lift_ban(CONTENT, 7, 99)
    kinds = ("message", "room", "ban", "unban", "closed")
    events = client.events(3, kinds=kinds)
    assert [(e.event, e.id) for e in events] == [
        ("room", slow.seq), ("ban", ban.seq), ("unban", lifted.seq)]
    assert events[0].json == room.to_json() and events[0].json["pinned"]["id"] == pinned["id"]
    assert events[1].json["author_id"] == 7 and events[1].json["type"] == "ban"
    assert events[1].json["until"] == ban.to_json()["until"]
    assert events[2].json == lifted.to_json()

    # Closing: the room, then `closed`, and the stream ends; a reconnection
    # (what a browser does with Last-Event-ID) is answered 204.
    closed, closing = store.set_room(CONTENT, 99, closed=True)
    rest = client.until_end(timeout=5)
    assert [(e.event, e.id) for e in rest if e.event != "keepalive"] == [
        ("room", closing.seq), ("closed", closing.seq)]
    assert rest[-1].json == closed.to_json() and rest[-1].json["closed"] is True
    wait_for(lambda: app.hub.budget.streams == 0, 5, "the stream's slot")
    for headers in ({}, {"Last-Event-ID": str(closing.seq)}):
        refused = streams(port, headers=headers)
        assert refused.head() == 204
        assert refused.headers["cache-control"] == "no-store"
    assert app.hub.budget.held == 0 and app.hub.budget.streams == 0

    # A long-poll at the cursor of the closed content is held, and the
    # reopening wakes it, asking no pause any more.
    answers = []
    poll = threading.Thread(target=lambda: answers.append(request(
        port, "GET", f"/contents/{CONTENT}/comments?since={closing.seq}&wait=10")))
    poll.start()
    wait_for(lambda: app.hub.budget.held == 1, 5, "the poll held")
    reopened, reopening = store.set_room(CONTENT, 99, closed=False)
    poll.join(5)
    status, page = answers[0]
    assert status == 200 and page["cursor"] == reopening.seq
    assert page["room"] == reopened.to_json() and page["poll_after_ms"] == 0
    assert page["events"] == [reopening.to_json()] and page["comments"] == []
