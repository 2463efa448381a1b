"""Several feeds over one connection (``?feeds=``): the long-poll's answer,
its hold on one slot, the canonical URL, bad input, the formats, the
conditional reads (``ETag``) of every feed answer, and the stream of
several feeds on a real server."""

from __future__ import annotations

import gzip
import json
import threading
import time

import falcon.testing
import pytest
import webtest
from sse_client import SSEClient
from test_hold import post_comment, request, wait_for, wait_held

from service.live.pages import Kind

pytestmark = pytest.mark.usefixtures("sqlite_url")


@pytest.fixture
def feeds_app(make_app_at, sqlite_url):
    return lambda **overrides: make_app_at(sqlite_url, **overrides)


def post(client, token, content_id, body, author=7):
    resp = client.post_json(f"/contents/{content_id}/comments", {"body": body},
                            headers={"Authorization": token(author)})
    return resp.json


def read(client, feeds, status=200, **params):
    query = "&".join([f"feeds={feeds}"] + [f"{k}={v}" for k, v in params.items()])
    return client.get(f"/comments?{query}", status=status)


def cursors(answer):
    return ",".join(f"{page['content_id']}:{page['cursor']}" for page in answer["feeds"])


# -- the answer ---------------------------------------------------------------


def test_an_answer_lists_every_named_feed_in_order_with_its_changes(feeds_app, token):
    client = webtest.TestApp(feeds_app())
    a = post(client, token, 1, "one")
    b = post(client, token, 3, "three")
    answer = read(client, "1:0,2:0,3:0").json
    assert [page["content_id"] for page in answer["feeds"]] == [1, 2, 3]
    one, two, three = answer["feeds"]
    assert [c["id"] for c in one["comments"]] == [a["id"]] and one["cursor"] == a["seq"]
    assert two["comments"] == [] and two["cursor"] == 0 and two["reset"] is False
    assert [c["id"] for c in three["comments"]] == [b["id"]]
    assert answer["poll_after_ms"] == 0
    # Each feed's entry is the single read's page, byte for byte in meaning.
    single = client.get("/contents/1/comments?since=0").json
    assert one == single
    # The next request, built from the answer alone, has nothing new: held, then empty.
    again = read(client, cursors(answer), wait=0).json
    assert all(page["comments"] == [] for page in again["feeds"])
    assert cursors(again) == cursors(answer)


def test_a_bare_content_is_its_latest_page_at_once(feeds_app, token):
    client = webtest.TestApp(feeds_app())
    for n in range(3):
        post(client, token, 5, f"c{n}")
    start = time.monotonic()
    answer = read(client, "4,5", wait=10).json
    assert time.monotonic() - start < 5  # not held: the latest page is there now
    empty, five = answer["feeds"]
    assert empty["content_id"] == 4 and empty["comments"] == [] and empty["cursor"] == 0
    assert [c["body"] for c in five["comments"]] == ["c0", "c1", "c2"]
    assert five == client.get("/contents/5/comments").json


def test_a_cursor_ahead_of_its_content_resets_that_feed_only(feeds_app, token):
    client = webtest.TestApp(feeds_app())
    post(client, token, 1, "one")
    answer = read(client, "1:0,2:99").json
    one, two = answer["feeds"]
    assert one["reset"] is False and len(one["comments"]) == 1
    assert two["reset"] is True and two["cursor"] == 0
    # A reset speaks of one client gone astray: no cache keeps it.
    assert "no-store" in read(client, "1:0,2:99").headers["Cache-Control"]


def test_a_held_read_wakes_on_a_change_to_any_feed_with_one_slot(feeds_app, token):
    app = feeds_app(hold_budget=2)
    client = webtest.TestApp(app)
    answers = []
    thread = threading.Thread(
        target=lambda: answers.append(read(client, "1:0,2:0,3:0", wait=20).json))
    thread.start()
    wait_held(app, 1)
    assert app.hub.budget.held == 1  # one slot for three feeds
    comment = post(client, token, 2, "to two")
    thread.join(10)
    (answer,) = answers
    assert [[c["id"] for c in page["comments"]] for page in answer["feeds"]] == [
        [], [comment["id"]], []]
    assert cursors(answer) == f"1:0,2:{comment['seq']},3:0"
    assert app.hub.budget.held == 0
    assert app.hub.budget.answers()[Kind.WOKEN.value] == 1
    # The pollers stay one per content, however many reads name it.
    assert sorted(p.feed.content_id for p in app.hub.pollers()) == [1, 2, 3]


def test_a_held_read_times_out_empty_and_a_spent_budget_sheds(feeds_app):
    app = feeds_app(hold_budget=1, shed_poll_after_ms=1500)
    client = webtest.TestApp(app)
    answers = []
    thread = threading.Thread(target=lambda: answers.append(read(client, "1:0,2:0", wait=2)))
    thread.start()
    wait_held(app, 1)
    shed = read(client, "1:0,2:0", wait=5).json  # the budget is spent: come back later
    assert shed["poll_after_ms"] == 1500 and cursors(shed) == "1:0,2:0"
    thread.join(10)
    (timeout,) = answers
    assert cursors(timeout.json) == "1:0,2:0"
    assert all(page["comments"] == [] for page in timeout.json["feeds"])
    assert app.hub.budget.held == 0
    counts = app.hub.budget.answers()
    assert counts[Kind.TIMEOUT.value] == 1 and counts[Kind.SHED.value] == 1


def test_two_feeds_changed_together_arrive_once(feeds_app, token):
    client = webtest.TestApp(feeds_app())
    first = read(client, "1:0,2:0", wait=0).json
    a = post(client, token, 1, "a")
    b = post(client, token, 2, "b")
    seen = []
    answer = first
    for _ in range(3):
        answer = read(client, cursors(answer), wait=0).json
        seen += [c["id"] for page in answer["feeds"] for c in page["comments"]]
    assert sorted(seen) == sorted([a["id"], b["id"]])


# -- the canonical URL and bad input ------------------------------------------


def test_another_order_is_redirected_to_the_canonical_url(feeds_app):
    client = webtest.TestApp(feeds_app())
    resp = client.get("/comments?wait=0&feeds=3:5,1,02:7&limit=10", status=307)
    assert resp.headers["Location"].endswith("/comments?wait=0&feeds=1,2:7,3:5&limit=10")
    assert "max-age" in resp.headers["Cache-Control"]
    resp = client.get("/comments/stream?feeds=2:0,1:0", status=307)
    assert resp.headers["Location"].endswith("/comments/stream?feeds=1:0,2:0")
    # The canonical URL is answered, not redirected again.
    read(client, "1,2:0,3:0", wait=0)


@pytest.mark.parametrize("feeds, code", [
    ("1:0,1:5", "invalid_request"),        # a content twice
    ("1:840,1", "invalid_request"),        # twice, once bare (was a 500)
    ("1:x", "invalid_request"),
    ("1:", "invalid_request"),
    (":1", "invalid_request"),
    ("0:1", "invalid_request"),             # content ids start at 1
    ("1:-1", "invalid_request"),
    ("1,,2", "invalid_request"),
    ("1:0,2:0,3:0,4:0", "too_many_feeds"),  # max_feeds=3
])
def test_bad_lists_are_refused_with_their_code(feeds_app, feeds, code):
    client = webtest.TestApp(feeds_app(max_feeds=3))
    resp = read(client, feeds, status=400, wait=0)
    assert resp.json["code"] == code, resp.json
    # The same on the stream, which takes the same list.
    resp = client.get(f"/comments/stream?feeds={feeds}", status=400)
    assert resp.json["code"] == code


def test_an_overlong_url_is_414_and_both_parameters_are_400(feeds_app):
    client = webtest.TestApp(feeds_app(max_feeds=3))
    resp = read(client, ",".join(f"{n}:0" for n in range(1, 200)), status=414)
    assert resp.json["code"] == "too_large"
    resp = client.get("/comments?content_id=1&feeds=1:0", status=400)
    assert resp.json["code"] == "invalid_request"
    assert client.get("/comments?feeds=", status=400).json["code"] == "invalid_request"
    assert client.get("/comments?feeds=1&feeds=2", status=400).json["code"] == "invalid_request"


# -- formats ------------------------------------------------------------------


def test_lines_name_each_feed_and_the_next_request(feeds_app, token):
    client = webtest.TestApp(feeds_app())
    a = post(client, token, 1, "one\tand\nmore")
    resp = read(client, "1:0,2:0", format="lines")
    assert resp.content_type == "text/plain"
    lines = resp.text.splitlines()
    assert lines[0] == f"feeds 1:{a['seq']},2:0 poll_after_ms 0"
    assert lines[1].startswith(f"feed 1 cursor {a['seq']} poll_after_ms 0 reset 0 closed 0")
    assert lines[2] == f"1\t{a['seq']}\t{a['id']}\t7\t0\tone\\tand\\nmore"
    assert lines[3].startswith("feed 2 cursor 0 ")
    assert len(lines) == 4


def test_jsonp_and_gzip(make_app_at, sqlite_url, token):
    client = webtest.TestApp(make_app_at(sqlite_url, jsonp=True, gzip_min_bytes=100))
    for n in range(5):
        post(client, token, 1, f"comment number {n} " * 5)
    resp = client.get("/comments?feeds=1:0,2:0&callback=cb")
    assert resp.text.startswith("/**/cb(") and resp.text.endswith(");")
    document = json.loads(resp.text[len("/**/cb("):-2])
    assert [page["content_id"] for page in document["feeds"]] == [1, 2]
    # WebTest would undo the gzip before the test saw it: a real request.
    status, headers, body = raw_get(client.app, "/comments?feeds=1:0,2:0",
                                    {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert len(json.loads(gzip.decompress(body))["feeds"][0]["comments"]) == 5


def raw_get(app, path, headers):
    """A GET straight through the app (Falcon's simulator), its body as sent."""
    result = falcon.testing.TestClient(app).simulate_get(
        path.split("?")[0], query_string=path.partition("?")[2], headers=headers)
    return result.status_code, result.headers, result.content


# -- conditional reads --------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/contents/1/comments",                # the latest page a screen re-fetches
    "/contents/1/comments?since=0",        # a catch-up page
    "/contents/1/comments?since=0&format=lines",
    "/comments?feeds=1,2:0",
    "/comments?feeds=1:0,2:0&format=lines",
])
def test_if_none_match_with_the_current_tag_is_304_at_once(feeds_app, token, path):
    client = webtest.TestApp(feeds_app())
    post(client, token, 1, "one")
    first = client.get(path)
    etag = first.headers["ETag"]
    assert etag.startswith('"') and len(etag) > 10
    start = time.monotonic()
    again = client.get(path + ("&" if "?" in path else "?") + "wait=20",
                       headers={"If-None-Match": etag}, status=304)
    assert time.monotonic() - start < 5  # answered at once, not held
    assert again.body == b"" and again.headers["ETag"] == etag
    # A weak form of the tag (a cache may weaken it) and a list match too.
    client.get(path, headers={"If-None-Match": f'"x", W/{etag}'}, status=304)
    # Once the answer changes, the tag does, and the page comes back.
    post(client, token, 1, "two")
    changed = client.get(path, headers={"If-None-Match": etag})
    assert changed.status_int == 200 and changed.headers["ETag"] != etag


def test_the_tag_names_the_format_and_encoding(make_app_at, sqlite_url, token):
    client = webtest.TestApp(make_app_at(sqlite_url, gzip_min_bytes=50))
    post(client, token, 1, "x" * 200)
    tags = {client.get("/contents/1/comments", headers=headers).headers["ETag"]
            for headers in ({}, {"Accept-Encoding": "gzip"}, {"Accept": "text/plain"})}
    assert len(tags) == 3


# -- the stream of several feeds ----------------------------------------------


def test_a_stream_of_several_feeds_names_contents_and_resumes_each(make_server, feeds_app,
                                                                   token):
    app = feeds_app(poll_interval=0.2)
    port = make_server(app).adj.port
    post_comment(port, token(7), "before", content_id=2)
    stream = SSEClient(port, "/comments/stream?feeds=1:0,2:0,3")
    try:
        assert stream.head() == 200
        rooms = [stream.next_event() for _ in range(3)]
        assert [(e.event, e.json["content_id"]) for e in rooms] == [
            ("room", 1), ("room", 2), ("room", 3)]
        (old,) = stream.events(1, timeout=10)
        assert old.json["body"] == "before" and old.json["content_id"] == 2
        a = post_comment(port, token(7), "to three", content_id=3)
        b = post_comment(port, token(7), "to one", content_id=1)
        got = stream.events(2, timeout=10)
        # In the order posted, or (both passed in one wake) in the feeds'
        # order: order is kept per feed, not across feeds.
        assert sorted((e.json["content_id"], e.json["id"]) for e in got) == [
            (1, b["id"]), (3, a["id"])]
        assert assert_compound(got[-1].id) == {1: b["seq"], 2: old.json["seq"],
                                               3: a["seq"]}
        last_id, after_it = got[0].id, got[1].json["id"]  # one feed moved on, not the other
    finally:
        stream.close()
    wait_for(lambda: app.hub.budget.streams == 0, 10, "the slot back")
    # A reconnect with Last-Event-ID gets what came after each feed's cursor.
    resumed = SSEClient(port, "/comments/stream?feeds=1:0,2:0,3",
                        headers={"Last-Event-ID": last_id})
    try:
        assert resumed.head() == 200
        (replayed,) = resumed.events(1, timeout=10)
        assert replayed.json["id"] == after_it
        c = post_comment(port, token(7), "after", content_id=2)
        (live,) = resumed.events(1, timeout=10)
        assert live.json["id"] == c["id"]  # nothing of the old twice
    finally:
        resumed.close()


def assert_compound(event_id):
    return {int(c): int(s) for c, s in (part.split(":") for part in event_id.split(","))}


def test_a_stream_of_closed_contents_is_204(make_server, feeds_app, token):
    app = feeds_app()
    port = make_server(app).adj.port
    for content_id in (1, 2):
        status, _ = request(port, "PATCH", f"/contents/{content_id}/room",
                            body={"closed": True},
                            headers={"Authorization": token(99, "moderator")})
        assert status == 200
    status, _ = request(port, "GET", "/comments/stream?feeds=1,2")
    assert status == 204
    assert app.hub.budget.streams == 0
