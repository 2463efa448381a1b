"""Contract cases of several feeds in one request and of conditional reads,
used by test_contract.py.

``GET /comments?feeds=`` (its 200s in every format, the 307 to the
canonical list, its refusals, 414), ``GET /comments/stream?feeds=`` (its
events, each naming its content, with compound ids), and the 304 of every
feed read whose ``If-None-Match`` names its answer's ``ETag``. Each is an
``@case`` producer collected in :data:`CASES`; :func:`feeds_pages` and
:func:`feeds_refusals` add to test_contract's ``GET /comments`` cases.
"""

from __future__ import annotations

import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor

from contract_clients import RawClient, streaming
from contract_moderation import ban, event_data_errors, lift, patch_room, stream_events, unjudged

CASES = {}

FEED = "/contents/{content_id}/comments"
STREAM = "/comments/stream"
#: The data schema of each event of a stream of several feeds.
FEEDS_EVENT_DATA = {"message": "Comment", "reset": "FeedPage", "room": "FeedRoom",
                    "closed": "FeedRoom", "ban": "FeedBanEvent", "unban": "FeedUnbanEvent"}


def case(method, path, status):
    """Register how to produce ``status`` from ``method path`` (as test_contract's)."""

    def register(produce):
        CASES[method, path, status] = produce
        return produce

    return register


def feeds(client, value, headers=None, **params):
    """``GET /comments?feeds=value&…``, the list sent as it is."""
    query = "&".join([f"feeds={value}"] + [f"{k}={v}" for k, v in params.items()])
    return client.get(f"/comments?{query}", headers=headers or {}, expect_errors=True)


def next_feeds(resp):
    """The next request's ``feeds``, from the answer alone."""
    return ",".join(f"{page['content_id']}:{page['cursor']}" for page in resp.json["feeds"])


# -- GET /comments?feeds= ----------------------------------------------------------


def feeds_pages(env):
    """The 200s of a read of several feeds (of contents 11 to 13, which
    no other case of the read moderates): at once (bare, catch-up, a
    reset of one feed), held then woken, held then timed out, shed, and in
    lines, JSONP and gzip."""
    one = env.post(env.live, "on one", content_id=11).json
    env.post(env.live, "on three", content_id=13)
    bare = feeds(env.live, "11,12,13")
    catch_up = feeds(env.live, "11:0,12:0,13:0", wait=0)
    reset = feeds(env.live, f"11:{one['seq']},12:99", wait=0)
    cursor = next_feeds(catch_up)
    with ThreadPoolExecutor(1) as pool:  # held on three feeds, woken by one
        held = pool.submit(feeds, env.live, cursor, wait=5)
        time.sleep(0.3)
        posted = env.post(env.live, "wakes the viewer", content_id=12).json
        woken = held.result()
    timeout = feeds(env.live, next_feeds(woken), wait=1)
    budget_of_one = env.client(hold_budget=1)
    with ThreadPoolExecutor(1) as pool:  # its one slot held: the next read is shed
        holding = pool.submit(feeds, budget_of_one, next_feeds(woken), wait=1)
        deadline = time.monotonic() + 10
        while budget_of_one.app.hub.budget.held == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        shed = feeds(budget_of_one, next_feeds(woken), wait=5)
        assert holding.result().status_int == 200
    env.post(env.live, "long " * 300, content_id=11)  # above gzip_min_bytes (1,024)
    lines = feeds(env.live, "11:0,12:0", format="lines")
    accepted = feeds(env.live, "11,12", headers={"Accept": "text/plain"})
    zipped = feeds(RawClient(env.live.app), "11:0,12:0", headers={"Accept-Encoding": "gzip"})
    script = feeds(env.client(jsonp=True), "11:0,12", callback="app.feeds.onPage")

    assert [page["content_id"] for page in bare.json["feeds"]] == [11, 12, 13]
    assert [len(page["comments"]) for page in catch_up.json["feeds"]] == [1, 0, 1]
    assert [page["reset"] for page in reset.json["feeds"]] == [False, True]
    assert [[c["id"] for c in page["comments"]] for page in woken.json["feeds"]] == [
        [], [posted["id"]], []]
    assert all(page["comments"] == [] for page in timeout.json["feeds"])
    assert next_feeds(timeout) == next_feeds(woken)
    assert shed.json["poll_after_ms"] > 0 and next_feeds(shed) == next_feeds(woken)
    first = lines.text.splitlines()[0]
    assert first.startswith("feeds 11:") and first.endswith(" poll_after_ms 0")
    assert accepted.content_type == "text/plain"
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(zipped.body))["feeds"][0]["content_id"] == 11
    assert script.body.startswith(b"/**/app.feeds.onPage({\"feeds\":[")
    pages = [bare, catch_up, reset, woken, timeout, shed, lines, accepted, zipped, script]
    for page in pages:
        assert page.status_int == 200, page
        assert page.headers["ETag"]
    return pages


def feeds_refusals(env):
    """The 400s of a read of several feeds, in JSON and in lines."""
    duplicate = unjudged(feeds(env.live, "1:0,1:5"))  # the pattern cannot see it
    refused = [
        feeds(env.live, ",".join(str(n) for n in range(1, 52))),  # 51 > max_feeds
        feeds(env.live, "1:x"), feeds(env.live, ""), feeds(env.live, "0:1"),
        feeds(env.live, "1,,2"), feeds(env.live, "1:-1"),
        feeds(env.live, "1:x", format="lines"),
        duplicate,
        # content_id and feeds together: refused, though each alone is fine
        env.live.get("/comments?content_id=1&feeds=1:0", expect_errors=True),
    ]
    assert refused[0].json["code"] == "too_many_feeds"
    assert refused[6].text.startswith("error invalid_request ")
    assert {r.json["code"] for r in refused if r.content_type == "application/json"} == {
        "too_many_feeds", "invalid_request"}
    return refused


@case("GET", "/comments", 307)
def _(env):
    resp = feeds(env.live, "3:5,1,02:7", wait=0, limit=10)
    assert resp.headers["Location"].endswith("/comments?feeds=1,2:7,3:5&wait=0&limit=10")
    assert resp.headers["Cache-Control"] == "public, max-age=3600"
    assert feeds(env.live, "1,2:7,3:5", wait=0, limit=10).status_int == 200
    return resp


@case("GET", "/comments", 414)
def _(env):
    entries = ",".join(f"{n}:0" for n in range(1, 800))
    refused = [feeds(env.live, entries), feeds(env.live, entries, format="lines")]
    assert refused[0].json["code"] == "too_large"
    assert refused[1].text.startswith("error too_large ")
    return refused


# -- conditional reads ---------------------------------------------------------------


def conditional(client, path, **params):
    """``path`` read twice: the second with the first answer's ETag: 304."""
    first = client.get(path, params=params)
    again = client.get(path, params=params, headers={"If-None-Match": first.headers["ETag"]},
                       expect_errors=True)
    assert again.status_int == 304 and again.body == b"", again
    assert again.headers["ETag"] == first.headers["ETag"]
    return again


@case("GET", FEED, 304)
def _(env):
    env.post(env.live, "one")
    return [conditional(env.live, "/contents/1/comments"),
            conditional(env.live, "/contents/1/comments", since=0, format="lines")]


@case("GET", "/comments", 304)
def _(env):
    env.post(env.live, "one")
    return [conditional(env.live, "/comments", content_id=1),
            conditional(env.live, "/comments?feeds=1,2:0"),
            conditional(env.live, "/comments?feeds=1:0,2:0&format=lines")]


# -- GET /comments/stream?feeds= ----------------------------------------------------------


def stream(client, value, headers=None, **params):
    query = "&".join([f"feeds={value}"] + [f"{k}={v}" for k, v in params.items()])
    return client.get(f"{STREAM}?{query}", headers=headers or {}, expect_errors=True)


def feed_events(resp):
    """``[(type, compound id, content_id)]`` of a stream of several feeds,
    every event's data checked against the document."""
    errors = event_data_errors(resp.text, FEEDS_EVENT_DATA)
    assert not errors, errors
    return [(kind, fields["id"],
             None if kind == "keepalive"  # its data is the compound id
             else json.loads(fields["data"])["content_id"])
            for kind, fields in stream_events(resp.text)]


@case("GET", STREAM, 200)
def _(env):
    client = streaming(env)
    a = env.post(env.live, "on one", content_id=1).json
    b = env.post(env.live, "on two", content_id=2).json
    assert ban(env, env.live, {"author_id": 5, "seconds": 60}, content_id=2).status_int == 201
    assert lift(env, env.live, 5, content_id=2).status_int == 204
    history = stream(client, "1:0,2:0,3")
    found = [e for e in feed_events(history) if e[0] != "keepalive"]
    assert found[:3] == [("room", "1:0,2:0,3:0", 1), ("room", "1:0,2:0,3:0", 2),
                         ("room", "1:0,2:0,3:0", 3)], found
    assert [(kind, content_id) for kind, _, content_id in found[3:]] == [
        ("message", 1), ("message", 2), ("ban", 2), ("unban", 2)], found
    assert found[3][1] == f"1:{a['seq']},2:0,3:0"
    assert found[4][1] == f"1:{a['seq']},2:{b['seq']},3:0"
    last = found[-1][1]
    # A reconnect resumes each feed after its cursor in Last-Event-ID.
    resumed = stream(client, "1:0,2:0,3", headers={"Last-Event-ID": f"1:{a['seq']},2:0"})
    assert [(k, c) for k, _, c in feed_events(resumed) if k not in ("keepalive", "room")] == [
        ("message", 2), ("ban", 2), ("unban", 2)]
    ahead = stream(client, "1:0,2:999")  # feed 2 reset, feed 1 as ever
    kinds = [(k, c) for k, _, c in feed_events(ahead) if k not in ("keepalive", "room")]
    assert ("reset", 2) in kinds and ("message", 1) in kinds
    assert any(block.startswith(f"id: 1:{a['seq']},2:") and "event: reset" in block
               for block in ahead.text.split("\n\n")), ahead.text
    # One feed closes while streaming: `closed` for it, the stream goes on.
    longer = streaming(env, sse_max_duration=1.5)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(stream, longer, last)
        time.sleep(0.4)
        assert patch_room(env, env.live, {"closed": True}, content_id=3).status_int == 200
        c = env.post(env.live, "after the closing", content_id=1).json
        closing = held.result()
    tail = [(k, c_id) for k, _, c_id in feed_events(closing) if k != "keepalive"]
    # The comment posted after the closing came: the stream went on.
    assert ("closed", 3) in tail and ("message", 1) in tail, tail
    assert feed_events(closing)[-1][1].startswith(f"1:{c['seq']},")
    return [history, resumed, ahead, closing]


@case("GET", STREAM, 204)
def _(env):
    for content_id in (1, 2):
        assert patch_room(env, env.live, {"closed": True}, content_id=content_id).status_int == 200
    answers = [stream(streaming(env), "1,2"), stream(streaming(env), "1:0,2:0")]
    for answer in answers:
        assert answer.body == b""
    return answers


@case("GET", STREAM, 307)
def _(env):
    resp = stream(env.live, "2:0,1:0")
    assert resp.headers["Location"].endswith("/comments/stream?feeds=1:0,2:0")
    return resp


@case("GET", STREAM, 400)
def _(env):
    refused = [stream(env.live, "1:x"), stream(env.live, ""), stream(env.live, "0"),
               stream(env.live, ",".join(str(n) for n in range(1, 52))),
               stream(env.live, "1:0", headers={"Last-Event-ID": "5"}),  # a single stream's id
               stream(env.live, "1:0", callback="cb"),
               env.live.get(STREAM, expect_errors=True),
               unjudged(stream(env.live, "1,1"))]
    assert refused[3].json["code"] == "too_many_feeds"
    return refused


@case("GET", STREAM, 414)
def _(env):
    resp = stream(env.live, ",".join(f"{n}:0" for n in range(1, 800)))
    assert resp.json["code"] == "too_large"
    return resp


@case("GET", STREAM, 503)
def _(env):
    refused = [stream(env.client(max_streams=0), "1,2"), stream(env.dead, "1:0,2")]
    for answer in refused:
        assert int(answer.headers["Retry-After"]) >= 1, answer
    return refused
