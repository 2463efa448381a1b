"""Pacing a busy feed: while changes come fast, every answer with changes
asks its viewers to come back after ``busy_pace_ms`` (the same for every
viewer of a page), so each answer carries a batch; a cache in front keeps
such an answer no longer than that pause, so a viewer behind the head gets
everything since its cursor in one answer, not a chain of small pages."""

from __future__ import annotations

import http.client
import json
import time

import pytest
import webtest
from components import require_program
from proxies import VARNISHD, start_varnish

from service.live.feed import BUSY_WAKES, BUSY_WINDOW, Feed
from service.live.pages import Kind
from service.web.caching import CACHE_MS_HEADER


class Change:
    """A comment as the feed sees it."""

    is_comment = True
    deleted = False
    type = None

    def __init__(self, seq):
        self.seq = self.id = seq
        self.author_id = 1
        self.body = f"c{seq}"

    def to_json(self):
        return {"id": self.id, "seq": self.seq, "body": self.body}


def feed_at(clock, pace=400):
    return Feed(1, [], 0, window_size=100, settle=lambda answered: None, store=None,
                busy_pace_ms=pace, clock=lambda: clock[0])


def test_a_quiet_feed_is_not_paced_and_a_busy_one_is():
    clock = [100.0]
    feed = feed_at(clock)
    # One change a second: quiet.
    for seq in range(1, 4):
        clock[0] += 1.0
        feed.publish([Change(seq)])
        assert json.loads(feed.page_after(seq - 1, 50).body)["poll_after_ms"] == 0
    # BUSY_WAKES within BUSY_WINDOW: every page with changes asks the pace.
    for seq in range(4, 4 + BUSY_WAKES):
        clock[0] += BUSY_WINDOW / (BUSY_WAKES + 1)
        feed.publish([Change(seq)])
    last = 3 + BUSY_WAKES
    page = feed.page_after(0, 50)
    assert page.poll_after_ms == 400 and json.loads(page.body)["poll_after_ms"] == 400
    assert feed.page_after(0, 50) is page  # one page, the same bytes, for every viewer
    # An empty answer (at the head) is not paced: the viewer holds there.
    assert feed.page_after(last, 50).poll_after_ms == 0
    assert feed.page(Kind.EMPTY, last).poll_after_ms == 0
    # Quiet again: the next change's pages are not paced.
    clock[0] += 5.0
    feed.publish([Change(last + 1)])
    assert feed.page_after(0, 50).poll_after_ms == 0


def test_one_burst_is_not_busy_and_pacing_off_is_0():
    clock = [0.0]
    # Forty changes in one publish (a ban retracting forty comments): one wake.
    feed = feed_at(clock)
    feed.publish([Change(seq) for seq in range(1, 41)])
    assert feed.page_after(0, 50).poll_after_ms == 0
    # Busy, with pacing off.
    feed = feed_at(clock, pace=0)
    for seq in range(1, 20):
        feed.publish([Change(seq)])
    assert feed.page_after(0, 50).poll_after_ms == 0


@pytest.fixture
def paced(make_app_at, sqlite_url):
    return lambda **overrides: make_app_at(sqlite_url, **overrides)


def burst(client, token, content_id, count, tag="b"):
    """``count`` comments at once to a content watched here (its feed counts
    the changes as they arrive)."""
    client.get(f"/contents/{content_id}/comments?wait=0")
    return [client.post_json(f"/contents/{content_id}/comments", {"body": f"{tag}{n}"},
                             headers={"Authorization": token(7)}).json
            for n in range(count)]


def test_a_busy_feed_paces_single_and_several_feed_reads(paced, token):
    client = webtest.TestApp(paced(busy_pace_ms=300, shared_cache_seconds=2))
    posted = []
    for attempt in range(5):  # on a machine too slow for BUSY_WAKES within BUSY_WINDOW, again
        posted += burst(client, token, 1, BUSY_WAKES + 1, tag=f"a{attempt}-")
        first = client.get("/contents/1/comments?since=0")
        if first.json["poll_after_ms"]:
            break
    assert first.json["poll_after_ms"] == 300 and len(first.json["comments"]) == len(posted)
    # A cache that reads it keeps the answer no longer than the pause.
    assert first.headers[CACHE_MS_HEADER] == "300"
    assert "s-maxage=2" in first.headers["Cache-Control"]
    # Every viewer of this cursor gets the same bytes.
    assert client.get("/contents/1/comments?since=0").body == first.body
    # Several feeds: the busy one's pace, though a quiet one changed too.
    client.post_json("/contents/2/comments", {"body": "quiet"},
                     headers={"Authorization": token(8)})
    many = client.get("/comments?feeds=1:0,2:0").json
    assert many["poll_after_ms"] == 300
    assert many["feeds"][1]["poll_after_ms"] == 0  # the quiet feed's own page
    # A quiet feed alone asks no pause.
    assert client.get("/comments?feeds=2:0").json["poll_after_ms"] == 0
    assert CACHE_MS_HEADER not in client.get("/contents/2/comments?since=0").headers


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.getheader("X-Cache"), json.loads(resp.read())
    finally:
        conn.close()


def test_varnish_keeps_a_paced_answer_only_for_its_pause(paced, make_server, tmp_path, token):
    """Behind the shipped VCL, with s-maxage 5 s: a viewer arriving at a
    cursor after the pace has passed is not handed the old page (which
    would send it on to the next one) but everything since its cursor."""
    require_program(VARNISHD, "varnish")
    app = paced(busy_pace_ms=300, shared_cache_seconds=5, poll_interval=0.2)
    port = make_server(app).adj.port
    client = webtest.TestApp(app)
    varnish = start_varnish(tmp_path, port)
    try:
        # A burst, and its page encoded while the feed is busy (kept by the
        # feed until the next change, so the cache's fetch gets it too);
        # on a machine too slow for BUSY_WAKES within BUSY_WINDOW, again.
        path = "/contents/1/comments?since=0&wait=0"
        for attempt in range(5):
            burst(client, token, 1, BUSY_WAKES + 1, tag=f"a{attempt}-")
            if CACHE_MS_HEADER in client.get(path).headers:
                break
        state, page = get(varnish.port, path)
        assert state == "miss" and page["poll_after_ms"] == 300
        posted = len(page["comments"])
        burst(client, token, 1, 3, tag="more")
        time.sleep(1.5)  # past the pace, well within s-maxage
        state, later = get(varnish.port, path)
        assert state == "miss", "the paced page outlived its pause"
        assert len(later["comments"]) == posted + 3  # all since the cursor, at once
        # A quiet feed's answer is kept for the whole s-maxage.
        client.post_json("/contents/2/comments", {"body": "quiet"},
                         headers={"Authorization": token(8)})
        quiet = "/contents/2/comments?since=0&wait=0"
        assert get(varnish.port, quiet)[0] == "miss"
        time.sleep(1.5)
        assert get(varnish.port, quiet)[0] == "hit"
    finally:
        varnish.stop()
