"""Several contents over one connection in a real browser: the demo page's
``?contents=`` view, built on ``LiveComments.connectMany``, in headless
Chromium against a real waitress server (the fixtures of test_browser).

One connection is checked three ways: the server holds one request (or one
stream) for the page however many contents it follows, every feed request
the page makes names all of them, and the page never has two feed requests
open at once (the next is sent only after the last was answered). Which of
its idle keep-alive sockets the browser sends the next one over is the
browser's choice: usually the same, now and then another (one left from
loading the page), so the sockets are reported, not asserted.
"""

from __future__ import annotations

import threading
import urllib.parse

import psutil
import pytest
import test_browser
from test_browser import wait_live, wait_until
from test_hold import AUTHOR, post_comment, request

pytestmark = pytest.mark.slow

browser = test_browser.browser  # the fixtures, shared
pages = test_browser.pages
serve = test_browser.serve

CONTENTS = list(range(101, 111))  # ten contents
FEED_PATHS = ("/comments", "/comments/stream")


class Front:
    """In front of the app: logs every GET's path, ``feeds`` value and the
    browser's port (which TCP connection it came over)."""

    def __init__(self, app):
        self.app = app
        self.gets = []  # (path, feeds value or None, remote port), in arrival order
        self._lock = threading.Lock()
        self.open = 0  # feed requests arrived and not yet answered
        self.most_open = 0

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] != "GET":
            return self.app(environ, start_response)
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        self.gets.append((environ["PATH_INFO"], query.get("feeds", [None])[0],
                          int(environ["REMOTE_PORT"])))
        if environ["PATH_INFO"] not in FEED_PATHS:
            return self.app(environ, start_response)
        with self._lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        answered = []

        def answer(status, headers, exc_info=None):
            # The answer's status line is decided before any of it is sent,
            # so before the browser can have sent its next request.
            if not answered:
                answered.append(status)
                with self._lock:
                    self.open -= 1
            return start_response(status, headers, exc_info)

        return self.app(environ, answer)

    def feeds(self):
        """The ``feeds`` of every feed request so far, as [(content id, cursor or None)]."""
        return [[parse_feed(entry) for entry in feeds.split(",")]
                for path, feeds, _ in self.gets if path in FEED_PATHS]

    def feed_ports(self):
        """The browser's ports the feed requests came from: one per TCP connection."""
        return {port for path, _, port in self.gets if path in FEED_PATHS}

    def single_reads(self):
        return [path for path, _, _ in self.gets
                if path.startswith("/contents/") and "/comments" in path]


def parse_feed(entry):
    content_id, _, cursor = entry.partition(":")
    return int(content_id), int(cursor) if cursor else None


def start(serve, **settings):
    fronts = []
    app, server = serve(wrap=lambda app: fronts.append(Front(app)) or fronts[0],
                        poll_interval=0.2, **settings)
    return app, server, fronts[0]


def browser_sockets(port):
    """The browser's ports of the established connections to the server's
    port (the server runs in this process: these are its ends of them)."""
    return {c.raddr.port for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port}


def shown(page, content_id):
    """[(comment id, body)] shown under the content's heading."""
    return [tuple(item) for item in page.run(
        "return Array.prototype.map.call(document.querySelectorAll("
        "'#content-' + arguments[0] + ' li'), function (li) {"
        " return [Number(li.getAttribute('data-id')), li.querySelector('.body').textContent];"
        " });", content_id)]


def headings(page):
    return page.run("return Array.prototype.map.call(document.querySelectorAll('#feeds h2'),"
                    " function (h) { return h.parentNode.id; });")


def one_request_held(app, transport):
    """The page's single held long-poll, or its single stream."""
    budget = app.hub.budget
    return budget.streams == 1 if transport == "sse" else budget.held == 1


@pytest.mark.parametrize("transport", ["poll", "sse"])
def test_one_page_follows_ten_contents_over_one_connection(serve, pages, token, transport):
    app, server, front = start(serve)
    port = server.adj.port
    before = {content_id: post_comment(port, token(AUTHOR), f"before, on {content_id}",
                                       content_id=content_id)
              for content_id in CONTENTS[::4]}  # history on three of them
    contents = ",".join(map(str, reversed(CONTENTS)))  # not canonical: the page sorts them
    page = pages(f"http://127.0.0.1:{port}/?contents={contents}&transport={transport}")
    wait_live(page, transport)
    assert headings(page) == [f"content-{c}" for c in CONTENTS]
    expected = {c: [] for c in CONTENTS}
    for content_id, comment in before.items():
        expected[content_id].append((comment["id"], comment["body"]))
    wait_until(lambda: all(shown(page, c) == expected[c] for c in CONTENTS), 5,
               "each content's latest page under its heading")

    wait_until(lambda: one_request_held(app, transport), 5, "the page's request to be held")
    sockets = [browser_sockets(port)]

    # Comments on five of the ten, interleaved, a reply, an HTML body and a deletion.
    targets = CONTENTS[1::2]
    for n in range(3):
        for content_id in targets:
            comment = post_comment(port, token(AUTHOR), f"<b>{n}</b> on {content_id}",
                                   content_id=content_id)
            expected[content_id].append((comment["id"], comment["body"]))
        sockets.append(browser_sockets(port))
    parent_id = expected[targets[0]][0][0]
    reply = post_comment(port, token(AUTHOR), "a reply", content_id=targets[0],
                         parent_id=parent_id)
    expected[targets[0]].append((reply["id"], "a reply"))
    gone_id = expected[targets[1]].pop(1)[0]
    status, _ = request(port, "DELETE", f"/contents/{targets[1]}/comments/{gone_id}",
                        headers={"Authorization": token(AUTHOR)})
    assert status == 204

    wait_until(lambda: all(shown(page, c) == expected[c] for c in CONTENTS), 10,
               "every comment under its content, once, and the deleted one gone")
    assert page.run("return document.querySelectorAll('#feeds b, #feeds script').length;") == 0
    page.screenshot(f"demo-multi-{transport}")
    wait_until(lambda: one_request_held(app, transport), 5, "the page's request to be held")
    sockets.append(browser_sockets(port))
    feed_ports = front.feed_ports()
    print(f"\nMEASURED {transport}: {len(front.feeds())} feed requests over "
          f"{len(feed_ports)} connection(s); the browser's established sockets "
          f"{[len(open_) for open_ in sockets]} ({[len(open_ & feed_ports) for open_ in sockets]} "
          f"carrying feed requests); held {app.hub.budget.held}, "
          f"streams {app.hub.budget.streams}")

    # One connection: one held request or stream, never two feed requests
    # open at once, each for all ten contents (canonical order), none per
    # content.
    assert front.most_open == 1
    assert app.hub.budget.streams == (1 if transport == "sse" else 0)
    assert front.single_reads() == []
    for feeds in front.feeds():
        assert [content_id for content_id, _ in feeds] == CONTENTS
    assert page.text("transport") == transport  # never fell back


@pytest.mark.parametrize("transport", ["poll", "sse"])
def test_following_and_unfollowing_keeps_the_other_contents_cursors(serve, pages, token,
                                                                    transport):
    app, server, front = start(serve)
    port = server.adj.port
    a, b, c, d = 201, 202, 203, 204
    page = pages(f"http://127.0.0.1:{port}/?contents={a},{b},{c}&transport={transport}")
    wait_live(page, transport)
    on_a = [post_comment(port, token(AUTHOR), "a1", content_id=a)]
    on_b = [post_comment(port, token(AUTHOR), "b1", content_id=b)]
    on_d = [post_comment(port, token(AUTHOR), "d1, before it is followed", content_id=d)]

    def pairs(comments):
        return [(comment["id"], comment["body"]) for comment in comments]

    wait_until(lambda: shown(page, a) == pairs(on_a) and shown(page, b) == pairs(on_b), 5,
               "the first comments")
    wait_until(lambda: one_request_held(app, transport), 5, "the page's request to be held")
    asked = len(front.feeds())

    # Unfollow c, follow d, through the page.
    page.click(f'#content-{c} [data-action="unfollow"]')
    page.type("#follow-id", str(d))
    page.click("#follow button[type=submit]")
    assert headings(page) == [f"content-{a}", f"content-{b}", f"content-{d}"]
    on_a.append(post_comment(port, token(AUTHOR), "a2", content_id=a))
    on_d.append(post_comment(port, token(AUTHOR), "d2", content_id=d))
    status, _ = request(port, "DELETE", f"/contents/{a}/comments/{on_a[0]['id']}",
                        headers={"Authorization": token(AUTHOR)})
    assert status == 204
    post_comment(port, token(AUTHOR), "c2, no longer followed", content_id=c)

    wait_until(lambda: (shown(page, a), shown(page, b), shown(page, d))
               == (pairs(on_a[1:]), pairs(on_b), pairs(on_d)), 10,
               "d from its latest page, a's new comment and tombstone")
    wait_until(lambda: one_request_held(app, transport), 5, "the page's request to be held")
    assert page.run(f"return document.getElementById('content-{c}');") is None

    # On the wire: every request went on from a's and b's cursors, never
    # from the start again, and c was not asked again; d was asked bare (its
    # latest page) once, then from its own cursor.
    after = front.feeds()[asked:]
    assert after, "the page asked nothing after the change"
    for feeds in after:
        cursors = dict(feeds)
        assert c not in cursors
        assert None not in (cursors[a], cursors[b]), f"a or b asked from the start: {feeds}"
        assert cursors[a] >= on_a[0]["seq"] and cursors[b] >= on_b[0]["seq"]
    with_d = [dict(feeds) for feeds in after if d in dict(feeds)]
    assert [list(feeds) for feeds in with_d] == [[a, b, d]] * len(with_d)
    assert with_d[0][d] is None
    assert all(feeds[d] is not None for feeds in with_d[1:])
    assert page.text("transport") == transport


@pytest.mark.parametrize("transport", ["poll", "sse"])
def test_a_closed_content_says_so_and_the_others_go_on(serve, pages, token, transport):
    app, server, front = start(serve)
    port = server.adj.port
    a, b = 301, 302
    page = pages(f"http://127.0.0.1:{port}/?contents={a},{b}&transport={transport}")
    wait_live(page, transport)
    moderator = {"Authorization": token(100, "moderator")}

    def state(content_id):
        return page.run("return document.querySelector('#content-' + arguments[0] +"
                        " ' .room-state').textContent;", content_id)

    status, _ = request(port, "PATCH", f"/contents/{a}/room", body={"closed": True},
                        headers=moderator)
    assert status == 200
    wait_until(lambda: state(a) == "ended", 5, "the closed content to say so")
    assert state(b) == ""
    comment = post_comment(port, token(AUTHOR), "on the open one", content_id=b)
    wait_until(lambda: shown(page, b) == [(comment["id"], "on the open one")], 5,
               "a comment on the other content")

    status, _ = request(port, "PATCH", f"/contents/{a}/room", body={"closed": False},
                        headers=moderator)
    assert status == 200
    wait_until(lambda: state(a) == "", 5, "the reopened content")
    comment = post_comment(port, token(AUTHOR), "on the reopened one", content_id=a)
    wait_until(lambda: shown(page, a) == [(comment["id"], "on the reopened one")], 5,
               "a comment on the reopened content")
    if transport == "sse":
        # One stream throughout: the closing and the reopening came on it
        # (the first page before it may have had a connection of its own).
        assert [path for path, _, _ in front.gets].count("/comments/stream") == 1
    assert front.most_open == 1
    assert page.text("transport") == transport  # the stream went on throughout
