"""Contract cases for the clients' routes and formats, used by test_contract.py.

The event stream (its moderation events and its end on a closed content
included), the browser client's files, the demo page and the development
token route, each as ``@case`` producers collected in :data:`CASES`; and the feed's other
formats (lines, gzip, JSONP), produced by :func:`format_pages` and
:func:`format_refusals` for test_contract's feed cases.

A stream is read whole through WebTest: its app ends each stream after
``sse_max_duration``, and sends keep-alives within it.
"""

from __future__ import annotations

import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor

import webtest
from contract_moderation import ban, event_data_errors, lift, patch_room, stream_events

CASES = {}

STREAM = "/contents/{content_id}/comments/stream"
#: The content the stream cases write to and follow.
STREAMED = 2
#: The content the stream cases moderate.
MODERATED_STREAM = 6


def case(method, path, status):
    """Register how to produce ``status`` from ``method path`` (as test_contract's)."""

    def register(produce):
        CASES[method, path, status] = produce
        return produce

    return register


class RawResponse(webtest.TestResponse):
    def decode_content(self):
        """Keep the body as sent: the contract covers ``Content-Encoding``."""


class RawRequest(webtest.TestRequest):
    ResponseClass = RawResponse


class RawClient(webtest.TestApp):
    """A WebTest client that leaves gzipped bodies and their headers alone."""

    RequestClass = RawRequest


# -- the feed's formats -----------------------------------------------------------


def format_pages(env, read):
    """The feed's 200s in its other formats; ``read(client, headers=None,
    **params)`` reads content 1 (which holds a comment and a tombstone)."""
    env.post(env.live, "tab\there, back\\slash\nand a second line")
    env.post(env.live, "long " * 300)  # a page above gzip_min_bytes (1,024)
    raw = RawClient(env.live.app)
    jsonp = env.client(jsonp=True)
    pages = [
        read(env.live, format="lines", since=0, wait=0),
        read(env.live, headers={"Accept": "text/plain"}),
        read(env.live, format="json"),
        read(raw, headers={"Accept-Encoding": "gzip"}),
        read(raw, headers={"Accept-Encoding": "gzip"}, format="lines", since=0, wait=0),
        read(jsonp, callback="app.feeds.onPage", since=0, wait=0),
        read(jsonp, callback="cb", format="lines"),  # callback wins
    ]
    lines, accepted, as_json, zipped, zipped_lines, script, wins = pages
    assert lines.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "\t1\t\n" in lines.text, "no tombstone line"
    assert any(line.count("\t") == 8 for line in lines.text.splitlines()), "no reply line"
    assert accepted.content_type == "text/plain" and as_json.content_type == "application/json"
    for answer in (zipped, zipped_lines):
        assert answer.headers["Content-Encoding"] == "gzip"
        assert int(answer.headers["Content-Length"]) == len(answer.body)
        gzip.decompress(answer.body)
    for answer in (script, wins):
        assert answer.content_type == "application/javascript"
        assert "Content-Encoding" not in answer.headers and "Vary" not in answer.headers
    assert script.body.startswith(b"/**/app.feeds.onPage({")
    assert wins.body.startswith(b"/**/cb({")
    return pages


def format_refusals(env, read):
    """The feed's 400s about formats: an unknown format (also beside a
    callback, which would win over a good one), a callback that is not a
    JavaScript name, and a callback while JSONP is off (the default), all
    in JSON; and a bad parameter of a lines read, in a line."""
    jsonp = env.client(jsonp=True)
    refused = [read(env.live, format="xml"), read(jsonp, callback="cb", format="xml"),
               read(jsonp, callback="alert(1)"), read(env.live, callback="cb"),
               read(env.live, format="lines", since=-1),
               read(env.live, headers={"Accept": "text/plain"}, limit=0)]
    assert [answer.content_type for answer in refused] == ["application/json"] * 4 + [
        "text/plain"] * 2
    return refused


# -- the event stream ---------------------------------------------------------------


def streaming(env, **settings):
    """A client whose streams end after half a second, with keep-alives."""
    return env.client(**{"sse_max_duration": 0.5, "sse_keepalive": 0.2, "poll_interval": 0.1,
                         **settings})


def stream(client, content_id=STREAMED, headers=None, **params):
    return client.get(f"/contents/{content_id}/comments/stream", params=params,
                      headers=headers or {}, expect_errors=True)


def events(resp):
    """``[(type, id, deleted)]`` of a stream, its events' data checked
    against the document."""
    errors = event_data_errors(resp.text)
    assert not errors, errors
    return _events(resp)


def _events(resp):
    """``[(type, id, deleted)]`` in the order sent. The type is the one
    ``EventSource`` dispatches: the ``event:`` field, else ``message``
    (comments and tombstones, for ``onmessage``); ``deleted`` is a
    message's, None for a named event."""
    return [(kind, int(fields["id"]),
             json.loads(fields["data"])["deleted"] if kind == "message" else None)
            for kind, fields in stream_events(resp.text)]


@case("GET", STREAM, 200)
def _(env):
    client = streaming(env)
    first = env.post(env.live, "streamed", content_id=STREAMED).json
    doomed = env.post(env.live, "doomed", content_id=STREAMED).json
    env.delete(env.live, f"/contents/{STREAMED}/comments/{doomed['id']}", author=1)
    cursor = first["seq"] + 2
    with ThreadPoolExecutor(1) as pool:  # held at the cursor, then a change
        held = pool.submit(stream, client, since=cursor)
        time.sleep(0.2)
        posted = env.post(env.live, "while streaming", content_id=STREAMED).json
        woken = held.result()
    answers = [
        stream(client),  # from now on: keep-alives only
        stream(client, since=0),  # history: a comment and a tombstone
        stream(client, since=0, headers={"Last-Event-ID": str(first["seq"])}),  # the header wins
        woken,
        stream(client, since=cursor + 100),  # ahead of the content: reset
        stream(client, since=0, headers={"Last-Event-ID": ""}),  # empty: ignored
    ]
    streams = [events(answer) for answer in answers]
    # Each starts with the room (unmoderated here: the default room) at
    # its start cursor.
    for found, start in zip(streams, [posted["seq"], 0, first["seq"], cursor], strict=False):
        assert ("room", start, None) in found[:2], found
    # Keep-alives come by the clock: how many a stream carries varies.
    now, history, resumed, woken, reset, unnamed = (
        [e for e in found if e[0] not in ("keepalive", "room")] for found in streams)
    assert unnamed == history
    assert answers[0].text.startswith("retry: 2000\n")
    assert now == [] and ("keepalive", posted["seq"], None) in streams[0][:2]
    assert history == [("message", first["seq"], False), ("message", cursor, True),
                       ("message", posted["seq"], False)]
    assert resumed == [("message", cursor, True), ("message", posted["seq"], False)]
    assert ("message", posted["seq"], False) in woken
    assert reset[0] == ("reset", posted["seq"], None)
    for answer in answers:
        assert answer.headers["X-Accel-Buffering"] == "no"
    return answers + moderated_streams(env, client)


def moderated_streams(env, client):
    """Streams of a moderated content: the room first, then a pin (a room
    event), a ban, a lift and, while a stream is open, the closing: a room
    event, ``closed``, and the end of the stream (long before its
    ``sse_max_duration``)."""
    c = MODERATED_STREAM
    comment = env.post(env.live, "pinned", content_id=c).json
    pinned = patch_room(env, env.live, {"pinned_comment_id": comment["id"]}, content_id=c)
    banned = ban(env, env.live, {"author_id": 2, "seconds": 60}, content_id=c)
    assert banned.status_int == 201
    assert lift(env, env.live, 2, content_id=c).status_int == 204
    history = stream(client, content_id=c, since=0)
    found = [e for e in events(history) if e[0] != "keepalive"]
    assert [kind for kind, _, _ in found] == ["room", "message", "room", "ban", "unban"], found
    assert found[0][1] == 0  # the room on connecting: at the cursor the stream starts after
    assert [seq for _, seq, _ in found[1:]] == sorted(seq for _, seq, _ in found[1:])
    now = events(stream(client, content_id=c))
    assert now[0][0] == "room" or now[1][0] == "room", now
    cursor = found[-1][1]
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(stream, streaming(env, sse_max_duration=30), content_id=c,
                           headers={"Last-Event-ID": str(cursor)})
        time.sleep(0.3)
        started = time.monotonic()
        closing = patch_room(env, env.live, {"closed": True}, content_id=c)
        assert closing.status_int == 200 and closing.json["pinned"]["id"] == comment["id"]
        ended = held.result()
    assert time.monotonic() - started < 10, "the stream did not end when the content closed"
    tail = [e for e in events(ended) if e[0] != "keepalive"]
    assert [kind for kind, _, _ in tail] == ["room", "room", "closed"], tail
    assert tail[1][1] == tail[2][1] > cursor
    closed = json.loads(ended.text.rstrip("\n").rsplit("data: ", 1)[1])
    assert closed["closed"] is True and pinned.json["pinned"] == closed["pinned"]
    return [history, ended]


@case("GET", STREAM, 204)
def _(env):
    assert patch_room(env, env.live, {"closed": True}, content_id=STREAMED).status_int == 200
    client = streaming(env)
    answers = [stream(client), stream(client, since=0),
               stream(client, headers={"Last-Event-ID": "1"})]
    for answer in answers:
        assert answer.body == b"", answer
    # Reopened (through another app: this one's poller learns of it), it streams again.
    assert patch_room(env, env.live, {"closed": False}, content_id=STREAMED).status_int == 200
    deadline = time.monotonic() + 5
    while (reopened := stream(client)).status_int == 204 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reopened.status_int == 200
    return answers


@case("GET", STREAM, 400)
def _(env):
    return [stream(env.live, headers={"Last-Event-ID": "abc"}),
            stream(env.live, headers={"Last-Event-ID": "-1"}),
            stream(env.live, since=-1),
            # refused all the same (a stream taking it would end in 0.5 s)
            stream(streaming(env), since=-1, headers={"Last-Event-ID": "3"}),
            stream(env.live, content_id=0),
            stream(env.live, callback="cb")]


@case("GET", STREAM, 503)
def _(env):
    capped = env.client(sse_max_duration=2, sse_keepalive=0.5, max_streams=1)
    drained = env.client()
    drained.app.close()
    with ThreadPoolExecutor(1) as pool:  # the one stream allowed, open meanwhile
        open_ = pool.submit(stream, capped)
        deadline = time.monotonic() + 10
        while capped.app.hub.budget.streams == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = [stream(capped), stream(capped, since=0)]
        assert open_.result().status_int == 200
    refused += [
        stream(env.client(max_streams=0)),  # streaming turned off
        stream(drained, headers={"Last-Event-ID": "0"}),  # shutting down
        stream(env.dead),  # the database does not answer
        stream(env.dead, since=5),
    ]
    for answer in refused:
        assert int(answer.headers["Retry-After"]) >= 1, answer
    assert [a.json["title"] for a in refused[:3]] == ["Too many streams"] * 3
    return refused


# -- the browser client's files and the demo page -------------------------------------


@case("GET", "/static/{name}", 200)
def _(env):
    script = env.live.get("/static/livecomments.js")
    version = script.headers["ETag"].strip('"')
    versioned = env.live.get("/static/livecomments.js", params={"v": version})
    assert script.headers["Cache-Control"] == "no-cache"
    assert "immutable" in versioned.headers["Cache-Control"]
    return [script, versioned, env.live.get("/static/demo.js"), env.live.get("/static/demo.css")]


@case("GET", "/static/{name}", 304)
def _(env):
    etag = env.live.get("/static/demo.js").headers["ETag"]
    return [env.live.get("/static/demo.js", headers={"If-None-Match": etag}, status=304),
            env.live.get("/static/demo.js", params={"v": etag.strip('"')},
                         headers={"If-None-Match": etag}, status=304)]


@case("GET", "/static/{name}", 404)
def _(env):
    return [env.live.get("/static/" + name, expect_errors=True)
            for name in ("nope.js", "demo.html", "app.py")]


@case("GET", "/static/{name}", 400)
def _(env):
    return env.live.get("/static/livecomments.js", params={"callback": "cb"}, expect_errors=True)


@case("GET", "/", 200)
def _(env):
    return env.live.get("/")


@case("GET", "/", 400)
def _(env):
    return env.live.get("/", params={"callback": "cb"}, expect_errors=True)


@case("GET", "/demo/{content_id}", 200)
def _(env):
    return [env.live.get("/demo/42"), env.live.get("/demo/1", params={"transport": "poll"})]


@case("GET", "/demo/{content_id}", 400)
def _(env):
    return [env.live.get(f"/demo/{content_id}", expect_errors=True)
            for content_id in ("abc", "0", str(2**63))] + [
        env.live.get("/demo/1", params={"callback": "cb"}, expect_errors=True)]


# -- the development token route ----------------------------------------------------------


def dev_token(client, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/dev/tokens", data, content_type=content_type, expect_errors=True)


@case("POST", "/dev/tokens", 201)
def _(env):
    dev = env.client(dev=True)
    user = dev_token(dev, {"author_id": 12})
    moderator = dev_token(dev, {"author_id": 99, "role": "moderator"})
    assert (user.json["author_id"], user.json["role"]) == (12, "user")
    assert (moderator.json["author_id"], moderator.json["role"]) == (99, "moderator")
    for answer in (user, moderator):
        assert answer.headers["Cache-Control"] == "no-store"
    # The tokens are the server's: a user's posts, a moderator's moderates.
    posted = dev.post_json("/contents/1/comments", {"body": "hi"},
                           headers={"Authorization": f"Bearer {user.json['token']}"})
    assert posted.json["author_id"] == 12
    closed = dev.patch_json("/contents/1/room", {"closed": True},
                            headers={"Authorization": f"Bearer {moderator.json['token']}"})
    assert closed.json["closed"] is True
    assert dev_token(env.live, {"author_id": 1}).status_int == 404  # development mode only
    return [user, moderator]


@case("POST", "/dev/tokens", 400)
def _(env):
    dev = env.client(dev=True)
    refused = [dev_token(dev, body) for body in (
        {}, {"author_id": 0}, {"author_id": "12"}, {"author_id": 12, "role": "admin"},
        {"author_id": 12, "ttl": 60}, [12], b'{"author_id": 12')]
    assert {answer.json["code"] for answer in refused} == {"invalid_request"}
    return refused


@case("POST", "/dev/tokens", 415)
def _(env):
    return dev_token(env.client(dev=True), b"author_id=12", content_type="text/plain")
