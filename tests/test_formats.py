"""Feed formats for constrained clients: gzip, JSONP, lines (and busybox
reading them), through the app and on a real server."""

from __future__ import annotations

import gzip
import http.client
import json
import random
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import webtest
from components import require_program
from conftest import make_settings
from fakes import ban_event, room_event, unban_event
from test_hold import AUTHOR, CONTENT, post_comment, request

import service.web.formats
from service.app import create_app
from service.common.errors import ErrorCode
from service.db.store import Comment, Store, create_engine
from service.db.values import Room
from service.live.pages import Kind, Page
from service.web import formats

REPO = Path(__file__).resolve().parent.parent
FEED = f"/contents/{CONTENT}/comments"


@pytest.fixture
def make_client(make_store, sqlite_url):
    """``make_client(**settings)``: a WebTest client over SQLite, and its app."""
    apps = []

    def make(**overrides):
        app = create_app(make_settings(sqlite_url, **overrides), store=make_store(sqlite_url))
        apps.append(app)
        return webtest.TestApp(app), app

    yield make
    for app in apps:
        app.close()


WORDS = ("the stream was great today and I loved the second half when the band came back "
         "on stage what a goal did anyone else see that replay lol this commentary is so "
         "good honestly best match of the season can we get a rematch please 🎉 👏").split()


def fill(app, count, author=AUTHOR):
    """``count`` comments of about 100 characters of chat-like text."""
    rng = random.Random(count)
    bodies = [" ".join(rng.choice(WORDS) for _ in range(20))[:100] for _ in range(count)]
    return [app.store.add_comment(CONTENT, author, body) for body in bodies]


def comment(seq, body="hi", deleted=False, id_=None):
    from datetime import UTC, datetime
    return Comment(id_ or seq, CONTENT, 7, None if deleted else body,
                   datetime(2026, 1, 1, tzinfo=UTC), seq, deleted)


# -- gzip ------------------------------------------------------------------------
# Over a real server: WebTest would undo the gzip before the test saw it.


def raw_get(port, path, headers=None):
    """(status, headers, body bytes exactly as sent)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", path, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, answer.headers, answer.read()
    finally:
        conn.close()


@pytest.fixture
def served(make_server, make_client):
    """``served(**settings)``: (port, app) of a real server over SQLite."""

    def make(**overrides):
        _, app = make_client(**overrides)
        return make_server(app).adj.port, app

    return make


def test_large_pages_are_gzipped_once_per_page(served, monkeypatch):
    calls = []
    real = service.web.formats._gzip
    monkeypatch.setattr(service.web.formats, "_gzip", lambda data: calls.append(1) or real(data))
    port, app = served()
    fill(app, 50)
    _, headers, plain = raw_get(port, FEED)
    zipped = [raw_get(port, FEED, {"Accept-Encoding": "gzip, deflate"}) for _ in range(3)]
    for status, zheaders, body in zipped:
        assert status == 200
        assert zheaders["Content-Encoding"] == "gzip"
        assert zheaders["Vary"] == "Accept, Accept-Encoding"
        assert int(zheaders["Content-Length"]) == len(body)
        assert gzip.decompress(body) == plain
    assert len({body for _, _, body in zipped}) == 1
    assert len(calls) == 1, "the page was gzipped more than once"
    assert "Content-Encoding" not in headers
    assert headers["Vary"] == "Accept, Accept-Encoding"
    size = len(zipped[0][2])
    print(f"\nMEASURED gzip on a 50-comment page (100-character bodies): {len(plain)} -> "
          f"{size} bytes ({len(plain) - size} saved, {100 * (len(plain) - size) / len(plain):.0f}%)")
    assert size < len(plain) / 2


@pytest.mark.parametrize("header", ["gzip;q=0", "identity", "br", None])
def test_no_gzip_unless_accepted(served, header):
    port, app = served()
    fill(app, 50)
    _, headers, body = raw_get(port, FEED, {} if header is None else {"Accept-Encoding": header})
    assert "Content-Encoding" not in headers
    json.loads(body)


def test_small_pages_and_gzip_off_are_sent_plain(served):
    port, app = served()
    fill(app, 2)
    assert "Content-Encoding" not in raw_get(port, FEED, {"Accept-Encoding": "gzip"})[1]
    port, app = served(gzip_min_bytes=0)
    fill(app, 50)
    assert "Content-Encoding" not in raw_get(port, FEED, {"Accept-Encoding": "gzip"})[1]


def test_gzip_on_a_held_poll(served, token):
    port, app = served()
    fill(app, 40)
    cursor = app.store.current_seq(CONTENT)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"{FEED}?since={cursor}&wait=10", headers={"Accept-Encoding": "gzip"})
    time.sleep(0.3)
    posted = post_comment(port, token(AUTHOR), "y" * 1500)
    answer = conn.getresponse()
    body = answer.read()
    conn.close()
    assert answer.getheader("Content-Encoding") == "gzip"
    assert int(answer.getheader("Content-Length")) == len(body)
    assert json.loads(gzip.decompress(body))["comments"][0]["id"] == posted["id"]


def test_accept_encoding_forms():
    assert formats.accepts_gzip("gzip")
    assert formats.accepts_gzip("deflate, gzip;q=0.5")
    assert formats.accepts_gzip("*")
    assert not formats.accepts_gzip("gzip;q=0")
    assert not formats.accepts_gzip("gzip;q=0.0, identity")
    assert not formats.accepts_gzip(None)
    assert not formats.accepts_gzip("gzip;q=junk")


# -- JSONP -----------------------------------------------------------------------


def test_jsonp_is_off_by_default(make_client):
    client, app = make_client()
    answer = client.get(FEED + "?callback=cb", expect_errors=True)
    assert answer.status_int == 400
    assert "LIVECOMMENTS_JSONP" in answer.json["description"]
    assert answer.json["code"] == "invalid_request"


def test_jsonp_answers_a_script_for_a_safe_callback(make_client):
    client, app = make_client(jsonp=True)
    app.store.add_comment(CONTENT, AUTHOR, "line\u2028separator </script>")
    answer = client.get(FEED + "?callback=app.feeds.onPage&since=0&wait=0")
    assert answer.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Cache-Control"] == "no-store"
    body = answer.body
    assert body.startswith(b"/**/app.feeds.onPage(") and body.endswith(b");")
    assert "\u2028".encode() not in body  # a line terminator in old JavaScript
    page = json.loads(body[len(b"/**/app.feeds.onPage("):-2])
    assert page["comments"][0]["body"] == "line\u2028separator </script>"
    same = client.get("/comments?content_id=42&since=0&wait=0&callback=cb")
    assert same.body.startswith(b"/**/cb(")


@pytest.mark.parametrize("name", [
    "alert(1)", "a..b", "1a", "a.", "a b", "a;b", "a" * 65, "a.b.c.d.e", "é", "a-b", "",
    "cb%0A",
])
def test_jsonp_refuses_unsafe_callbacks(make_client, name):
    client, _ = make_client(jsonp=True)
    answer = client.get(FEED + "?callback=" + name, expect_errors=True)
    assert answer.status_int == 400
    assert answer.content_type == "application/json"


@pytest.mark.parametrize(("method", "path"), [
    ("POST", FEED), ("DELETE", f"{FEED}/1"), ("GET", "/healthz"),
    ("GET", f"{FEED}/stream"), ("GET", "/static/livecomments.js"), ("GET", "/demo/1"),
])
def test_callback_is_refused_on_every_other_route(make_client, token, method, path):
    client, app = make_client(jsonp=True)
    app.store.add_comment(CONTENT, AUTHOR, "x")
    answer = client.request(path + "?callback=cb", method=method, expect_errors=True,
                            headers={"Authorization": token(AUTHOR)})
    assert answer.status_int == 400
    assert app.store.current_seq(CONTENT) == 1  # nothing changed
    assert app.hub.budget.held == 0


# -- lines -----------------------------------------------------------------------


def test_lines_encode_each_change_on_one_line():
    page = Page.encode(Kind.CATCH_UP, CONTENT, [
        comment(3, "plain"),
        comment(4, "tab\there\nnew line\\n not an escape\r"),
        comment(5, deleted=True, id_=2),
    ], 5)
    assert formats.encode_lines(page).decode().split("\n") == [
        "cursor 5 poll_after_ms 0 reset 0 closed 0 slow_mode 0 pinned 0",
        "3\t3\t7\t0\tplain",
        "4\t4\t7\t0\ttab\\there\\nnew line\\\\n not an escape\\r",
        "5\t2\t7\t1\t",
        "",
    ]
    reset = Page.encode(Kind.RESET, CONTENT, [], 9)
    shed = Page.encode(Kind.SHED, CONTENT, [], 9, poll_after_ms=2000)
    assert formats.encode_lines(reset) == (
        b"cursor 9 poll_after_ms 0 reset 1 closed 0 slow_mode 0 pinned 0\n")
    assert formats.encode_lines(shed) == (
        b"cursor 9 poll_after_ms 2000 reset 0 closed 0 slow_mode 0 pinned 0\n")


def test_lines_carry_the_room_and_name_each_moderation_event():
    pinned = comment(3, "pinned")
    closed = Room(closed=True, slow_mode_seconds=30, pinned=pinned).to_json()
    page = Page.encode(Kind.WOKEN, CONTENT, [
        comment(3, "pinned"),
        room_event(4, closed=True, slow_mode_seconds=30, pinned=pinned, content_id=CONTENT),
        ban_event(5, 12, until="2026-01-01T01:00:00.000000Z", content_id=CONTENT),
        ban_event(6, 13, content_id=CONTENT),
        unban_event(7, 12, content_id=CONTENT),
        comment(8, deleted=True, id_=2),
    ], 8, room=closed, closed_poll_after_ms=300000)
    assert formats.encode_lines(page).decode().split("\n") == [
        "cursor 8 poll_after_ms 300000 reset 0 closed 1 slow_mode 30 pinned 3",
        "3\t3\t7\t0\tpinned",
        "4\troom\t1\t30\t3",
        "5\tban\t12\t2026-01-01T01:00:00.000000Z",
        "6\tban\t13\t-",
        "7\tunban\t12",
        "8\t2\t7\t1\t",
        "",
    ]
    opened = Page.encode(Kind.CATCH_UP, CONTENT, [room_event(9, content_id=CONTENT)], 9)
    assert formats.encode_lines(opened).decode().split("\n")[:2] == [
        "cursor 9 poll_after_ms 0 reset 0 closed 0 slow_mode 0 pinned 0", "9\troom\t0\t0\t0"]


def test_lines_of_a_moderated_content_through_the_app(make_client):
    client, app = make_client()
    first = app.store.add_comment(CONTENT, AUTHOR, "first")
    _, slow = app.store.set_room(CONTENT, 99, slow_mode_seconds=30, pinned_comment_id=first.id)
    ban = app.store.ban(CONTENT, 9, seconds=60, moderator_id=99)
    answer = client.get(FEED + "?format=lines&since=0")
    until = ban.to_json()["until"]
    assert answer.text.split("\n") == [
        f"cursor {ban.seq} poll_after_ms 0 reset 0 closed 0 slow_mode 30 pinned {first.id}",
        f"{first.seq}\t{first.id}\t{AUTHOR}\t0\tfirst",
        f"{slow.seq}\troom\t0\t30\t{first.id}",
        f"{ban.seq}\tban\t9\t{until}",
        "",
    ]
    _, closing = app.store.set_room(CONTENT, 99, closed=True)
    app.hub.wake(CONTENT)  # as the moderation route would have the feed know it
    assert app.hub.wait_visible(CONTENT, closing.seq)
    answer = client.get(FEED + f"?format=lines&since={closing.seq}&wait=0")
    assert answer.text == (f"cursor {closing.seq} poll_after_ms 300000 reset 0 closed 1 "
                           f"slow_mode 30 pinned {first.id}\n")
    latest = client.get(FEED + "?format=lines").text.split("\n")
    assert latest[0] == (f"cursor {closing.seq} poll_after_ms 300000 reset 0 closed 1 "
                         f"slow_mode 30 pinned {first.id}")
    assert latest[1:] == [f"{first.seq}\t{first.id}\t{AUTHOR}\t0\tfirst", ""]  # comments only


def test_json_and_jsonp_carry_the_same_room_and_events():
    room = Room(slow_mode_seconds=10).to_json()
    page = Page.encode(Kind.CATCH_UP, CONTENT, [comment(1), ban_event(2, 12, content_id=CONTENT)],
                       2, room=room)
    decoded = json.loads(page.body)
    assert list(decoded) == ["content_id", "comments", "events", "room", "cursor",
                             "poll_after_ms", "reset"]
    assert [c["seq"] for c in decoded["comments"]] == [1]
    assert decoded["events"] == [ban_event(2, 12, content_id=CONTENT).to_json()]
    assert decoded["room"] == room
    script, _ = formats.render(page, formats.JSONP, callback="cb")
    assert script == b"/**/cb(" + page.body + b");"


@pytest.mark.parametrize("ask", [{"params": "format=lines"}, {"accept": "text/plain"},
                                 {"accept": "text/plain, */*;q=0.1"}])
def test_lines_are_asked_for_by_format_or_accept(make_client, ask):
    client, app = make_client()
    app.store.add_comment(CONTENT, AUTHOR, "héllo")
    headers = {"Accept": ask["accept"]} if "accept" in ask else {}
    answer = client.get(FEED + "?" + ask.get("params", ""), headers=headers)
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert answer.body.decode() == (
        "cursor 1 poll_after_ms 0 reset 0 closed 0 slow_mode 0 pinned 0\n1\t1\t5\t0\théllo\n")


@pytest.mark.parametrize("accept", ["*/*", "application/json, text/plain, */*",
                                    "text/html,application/xhtml+xml,*/*;q=0.8"])
def test_json_stays_the_default(make_client, accept):
    client, _ = make_client()
    assert client.get(FEED, headers={"Accept": accept}).content_type == "application/json"


def test_unknown_format_is_refused(make_client):
    client, _ = make_client()
    answer = client.get(FEED + "?format=xml", headers={"Accept": "text/plain"},
                        expect_errors=True)
    assert answer.status_int == 400  # in JSON: which format was meant is unknown
    assert answer.json["code"] == "invalid_request"


# -- errors in each format ---------------------------------------------------------


def test_an_error_line_is_one_escaped_line():
    assert formats.encode_error_line(ErrorCode.UNAVAILABLE, "down\tnow\nretry\\") == (
        b"error unavailable down\\tnow\\nretry\\\\\n")


LINES_REFUSALS = [
    (FEED, {"since": "-1"}),
    (FEED, {"limit": "0"}),
    ("/contents/abc/comments", {}),
    ("/comments", {}),  # no content_id
    ("/comments", {"content_id": "0"}),
    ("/comments", {"content_id": str(CONTENT), "wait": "x"}),
]


@pytest.mark.parametrize("ask", [{"format": "lines"}, {"accept": "text/plain"}],
                         ids=["format", "accept"])
@pytest.mark.parametrize(("path", "params"), LINES_REFUSALS,
                         ids=[f"{p}?{urlencode(q)}" for p, q in LINES_REFUSALS])
def test_a_lines_read_is_refused_in_a_line(make_client, ask, path, params):
    client, _ = make_client()
    params = dict(params, **({"format": "lines"} if "format" in ask else {}))
    headers = {"Accept": ask["accept"]} if "accept" in ask else {}
    answer = client.get(path, params=params, headers=headers, expect_errors=True)
    assert answer.status_int == 400
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert answer.headers["Cache-Control"] == "no-store"
    kind, code, description = answer.text.split(" ", 2)
    assert (kind, code) == ("error", "invalid_request"), answer.text
    assert description.endswith("\n") and "\n" not in description[:-1]


def test_a_lines_read_gets_unavailable_in_a_line(make_client):
    dead_url = "sqlite:////nonexistent-livecomments-dir/x/comments.db"
    dead = create_app(make_settings(dead_url), store=Store(create_engine(dead_url)))
    try:
        answer = webtest.TestApp(dead).get(FEED + "?format=lines", expect_errors=True)
    finally:
        dead.close()
    assert answer.status_int == 503 and int(answer.headers["Retry-After"]) >= 1
    assert answer.text.startswith("error unavailable ") and answer.text.count("\n") == 1
    client, app = make_client()
    app.close()  # draining
    answer = client.get(FEED + "?format=lines&since=0", expect_errors=True)
    assert answer.status_int == 503
    assert answer.text == "error unavailable this server is stopping; retry with the same cursor\n"


@pytest.mark.parametrize("query", ["callback=alert(1)&format=lines", "callback=cb&format=xml",
                                   "format=lines&callback=a..b&since=-1"])
def test_a_jsonp_read_is_refused_in_json(make_client, query):
    client, _ = make_client(jsonp=True)
    answer = client.get(FEED + "?" + query, expect_errors=True)
    assert answer.status_int == 400 and answer.content_type == "application/json"
    assert answer.json["code"] == "invalid_request"


def documented_lines_client(name="lines-client"):
    page = (REPO / "docs" / "clients.md").read_text()
    block = re.search(rf"<!-- {name}.*?-->\n```sh\n(.*?)```\n<!-- end {name} -->",
                      page, re.DOTALL)
    assert block, f"docs/clients.md lost its {name} script"
    return block[1]


def run_busybox_script(tmp_path, text, *args):
    """``text`` run by ``busybox sh`` with ``args``, with busybox alone on
    the PATH (its wget and sh only); the process, its output a pipe."""
    busybox = require_program("busybox")
    script = tmp_path / "client.sh"
    script.write_text(text)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "busybox").symlink_to(busybox)
    return subprocess.Popen(
        [busybox, "sh", str(script), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": str(tmp_path / "bin")},
    )


@pytest.mark.slow
def test_the_documented_busybox_loop_follows_a_content(make_server, make_client, token, tmp_path):
    _, app = make_client(poll_interval=0.2)
    port = make_server(app).adj.port
    before = post_comment(port, token(AUTHOR), "before the loop")
    loop = run_busybox_script(tmp_path, documented_lines_client(),
                              f"http://127.0.0.1:{port}", str(CONTENT))
    try:
        assert loop.stdout.readline() == f"{before['seq']} {AUTHOR} before the loop\n"
        tricky = post_comment(port, token(AUTHOR), "tab\there, back\\slash\\n, ünï 😀\nline 2")
        first, second = loop.stdout.readline(), loop.stdout.readline()
        assert first + second == (
            f"{tricky['seq']} {AUTHOR} tab\there, back\\slash\\n, ünï 😀\nline 2\n")
        status, _ = request(port, "DELETE", f"{FEED}/{before['id']}",
                            headers={"Authorization": token(AUTHOR)})
        assert status == 204
        assert loop.stdout.readline() == f"- {before['id']}\n"
        reply = post_comment(port, token(AUTHOR), "so true", parent_id=tricky["id"])
        assert loop.stdout.readline() == f"{reply['seq']} {AUTHOR} so true\n"
        assert loop.stdout.readline() == (
            f"  ↳ reply to #{tricky['id']} ({AUTHOR}: tab\there, back\\slash\\n, ünï 😀\n")
        assert loop.stdout.readline() == "line 2)\n"
        # Moderation events are lines of their own, which the loop prints.
        app.store.set_room(CONTENT, 99, slow_mode_seconds=5)
        assert loop.stdout.readline() == "* room closed 0 slow_mode 5 pinned 0\n"
        app.store.ban(CONTENT, 9, moderator_id=99)
        assert loop.stdout.readline() == "* ban 9 until -\n"
        app.store.lift_ban(CONTENT, 9, 99)
        assert loop.stdout.readline() == "* unban 9\n"
        app.store.set_room(CONTENT, 99, closed=True, pinned_comment_id=tricky["id"])
        assert loop.stdout.readline() == f"* room closed 1 slow_mode 5 pinned {tricky['id']}\n"
    finally:
        loop.kill()
        loop.wait()


@pytest.mark.slow
def test_the_documented_busybox_loop_follows_three_contents(make_server, make_client, token,
                                                            tmp_path):
    """docs/clients.md's loop of ``?feeds=`` in lines: one request at a time
    for three contents, named out of order (redirected once), prints every
    comment once, under its content, and a deletion under its content."""
    _, app = make_client(poll_interval=0.2)
    port = make_server(app).adj.port
    before = {content: post_comment(port, token(AUTHOR), f"before on {content}",
                                    content_id=content) for content in (11, 12)}
    loop = run_busybox_script(tmp_path, documented_lines_client("feeds-client"),
                              f"http://127.0.0.1:{port}", "13,11,12")
    seen = []

    def printed(count):
        for _ in range(count):
            line = loop.stdout.readline()
            assert line, f"the loop ended: {loop.stderr.read()}"
            seen.append(line)
        return seen[-count:]

    try:
        # The latest pages first, in ascending content order.
        assert printed(2) == [f"11 {before[11]['seq']} {AUTHOR} before on 11\n",
                              f"12 {before[12]['seq']} {AUTHOR} before on 12\n"]
        expected, owed = [], 0
        for n, content in enumerate([13, 11, 13, 12, 11, 12, 13]):
            comment = post_comment(port, token(AUTHOR), f"comment {n} on {content}",
                                   content_id=content)
            expected.append(f"{content} {comment['seq']} {AUTHOR} comment {n} on {content}\n")
            owed += 1
            if n % 3 == 2:  # now and then wait for them: the loop is held when the next comes
                printed(owed)
                owed = 0
        printed(owed)
        # Two posted back to back to different contents: each once.
        together = [post_comment(port, token(AUTHOR), "together", content_id=c) for c in (11, 13)]
        expected += [f"{c} {t['seq']} {AUTHOR} together\n" for c, t in zip((11, 13), together, strict=True)]
        printed(2)
        status, _ = request(port, "DELETE", f"/contents/12/comments/{before[12]['id']}",
                            headers={"Authorization": token(AUTHOR)})
        assert status == 204
        assert printed(1) == [f"12 - {before[12]['id']}\n"]
        shown = seen[2:-1]
        assert sorted(shown) == sorted(expected), shown  # every comment once, under its content
        for content in (11, 12, 13):  # and each content's in order
            mine = [line for line in shown if line.startswith(f"{content} ")]
            assert mine == [line for line in expected if line.startswith(f"{content} ")]
    finally:
        loop.kill()
        loop.wait()
