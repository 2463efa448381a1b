"""The service behind real Varnish and nginx on the shipped configurations
(``deploy/``), in shared-cache mode.

Hundreds of viewers held at one cursor through a cache must be one held
request upstream, counted by the service itself (``/healthz`` answers by
kind). Moderation, on PostgreSQL: a ban with retraction and a closing reach
every viewer through the cache, each change once, at one upstream answer
per page URL; the moderation routes pass through, never kept. Viewers are
aiohttp requests in one asyncio loop. Without varnishd or
nginx these tests are skipped, with the reason shown; under ``CI=true``
that is a failure. Run with ``-s`` to see what they measured.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import statistics
import threading
import time

import aiohttp
import pytest
from conftest import IN_CI
from proxies import NGINX, VARNISHD, start_nginx, start_varnish
from sse_client import SSEClient

from service.serve.server import raise_open_file_limit

pytestmark = pytest.mark.slow

CONTENT = 42
VIEWERS = 500
SHARED = "public, max-age=0, s-maxage=1"
CACHES = {"varnish": (VARNISHD, start_varnish), "nginx": (NGINX, start_nginx)}


def require(binary):
    if os.path.exists(binary) or shutil.which(binary):
        return
    reason = f"{binary} is not installed (apt-get install varnish nginx)"
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture
def database_url(sqlite_url):
    """SQLite only: the caches are the subject here, not the database."""
    return sqlite_url


@pytest.fixture(params=sorted(CACHES))
def behind_cache(request, make_app, make_app_at, make_server, tmp_path):
    """``behind_cache(database=None, **settings)``: (app, service port, cache
    port) for a shared-mode app on waitress behind the cache this test runs
    with, over SQLite (or over ``database``, a URL: PostgreSQL's)."""
    binary, start = CACHES[request.param]
    require(binary)
    raise_open_file_limit(4 * VIEWERS + 1024)
    proxies = []

    def make(wrap=None, database=None, **overrides):
        settings = {"shared_cache_seconds": 1, "poll_interval": 0.2, **overrides}
        app = make_app(**settings) if database is None else make_app_at(database, **settings)
        port = make_server(app if wrap is None else wrap(app)).adj.port
        workdir = tmp_path / f"{request.param}{len(proxies)}"
        workdir.mkdir()
        proxies.append(start(workdir, port))
        return app, port, proxies[-1].port

    make.name = request.param
    yield make
    for proxy in proxies:
        proxy.stop()


def request(port, method, path, *, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, (
            json.loads(raw) if raw else None)
    finally:
        conn.close()


def answers(port):
    """The service's feed answers so far, by kind (asked of it directly)."""
    status, _, health = request(port, "GET", "/healthz")
    assert status == 200
    return health["answers"]


def upstream_since(port, before):
    """Feed answers the service gave since ``before``, by kind (only kinds that moved)."""
    now = answers(port)
    return {kind: now[kind] - before[kind] for kind in now if now[kind] != before[kind]}


def feed_url(port, since, wait):
    return f"http://127.0.0.1:{port}/contents/{CONTENT}/comments?since={since}&wait={wait}"


def report(name, samples):
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print(f"\nMEASURED {name}: n={len(samples)} median={statistics.median(samples) * 1000:.0f} ms "
          f"p99={p99 * 1000:.0f} ms max={samples[-1] * 1000:.0f} ms")


class Viewers:
    """Many viewers in one aiohttp session; counts the requests it has sent."""

    def __init__(self):
        self.sent = 0
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(self._on_sent)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), trace_configs=[trace],
            timeout=aiohttp.ClientTimeout(total=40),
        )

    async def _on_sent(self, session, context, params):
        self.sent += 1

    async def get(self, url):
        async with self.session.get(url) as resp:
            return time.monotonic(), resp.status, resp.headers, await resp.read()

    async def send(self, method, url, *, body=None, headers=None):
        async with self.session.request(method, url, json=body, headers=headers) as resp:
            return resp.status, resp.headers, await resp.read()

    async def hold(self, url, count, app):
        """``count`` GETs of ``url``, sent and (but one) waiting in the cache."""
        first = self.sent
        tasks = [asyncio.create_task(self.get(url)) for _ in range(count)]
        deadline = time.monotonic() + 20
        while self.sent - first < count or app.hub.budget.held < 1:
            assert time.monotonic() < deadline, f"sent {self.sent - first} of {count}"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # the last requests reach the cache
        return tasks

    async def close(self):
        await self.session.close()


def test_500_viewers_at_one_cursor_are_one_upstream_request(behind_cache, token):
    # A hold budget of 30: without the cache, 470 of the 500 would be shed.
    app, port, cache = behind_cache()
    created = request(port, "POST", f"/contents/{CONTENT}/comments", body={"body": "first"},
                      headers={"Authorization": token(1)})[2]

    async def scenario():
        viewers = Viewers()
        try:
            rounds = []
            cursor = created["seq"]
            for write in ("POST", "DELETE"):
                before = answers(port)
                held = await viewers.hold(feed_url(cache, cursor, 20), VIEWERS, app)
                started = time.monotonic()
                if write == "POST":  # through the cache
                    status, headers, raw = await viewers.send(
                        "POST", f"http://127.0.0.1:{cache}/contents/{CONTENT}/comments",
                        body={"body": "to five hundred"}, headers={"Authorization": token(1)})
                    assert status == 201, raw
                    change = json.loads(raw)
                else:
                    status, headers, _ = await viewers.send(
                        "DELETE",
                        f"http://127.0.0.1:{cache}/contents/{CONTENT}/comments/{created['id']}",
                        headers={"Authorization": token(1)})
                    assert status == 204
                    change = {"id": created["id"], "seq": cursor + 1}
                assert headers["Cache-Control"] == "no-store"
                results = await asyncio.gather(*held)
                rounds.append((write, change, started, results, upstream_since(port, before)))
                cursor = change["seq"]
            return rounds
        finally:
            await viewers.close()

    for write, change, started, results, upstream in asyncio.run(scenario()):
        for done_at, status, headers, raw in results:
            assert status == 200, raw
            page = json.loads(raw)
            assert [c["id"] for c in page["comments"]] == [change["id"]], page
            assert page["cursor"] == change["seq"]
            assert done_at >= started, "answered before the change: not held"
            assert headers["Cache-Control"] == SHARED
        assert len({raw for *_, raw in results}) == 1
        report(f"{VIEWERS} viewers through {behind_cache.name}, after a {write}",
               [done_at - started for done_at, *_ in results])
        print(f"MEASURED upstream feed answers for {VIEWERS} deliveries: {upstream}")
        # One held request upstream: a couple more if the cache let one by.
        assert upstream.get("woken", 0) >= 1
        assert sum(upstream.values()) <= 3, upstream
    assert app.hub.budget.held == 0



# -- several feeds over one connection (?feeds=) -----------------------------------

FEEDS = (42, 43, 44, 45, 46)
ROUNDS = 10  # one comment a round, round robin over the five contents


def feeds_url(port, cursors, wait):
    """The canonical read of every feed at ``cursors`` ({content: cursor})."""
    listed = ",".join(f"{content}:{cursors[content]}" for content in sorted(cursors))
    return f"http://127.0.0.1:{port}/comments?feeds={listed}&wait={wait}"


def next_cursors(answer):
    return {page["content_id"]: page["cursor"] for page in answer["feeds"]}


def test_500_viewers_of_five_feeds_are_one_upstream_request_per_change(behind_cache, token):
    """500 viewers follow the same five contents with one long-poll each
    (``/comments?feeds=``) through the cache. Joining with the feeds listed
    in another order, they are redirected (307, kept by the cache) to the
    canonical URL and get the latest pages there, one upstream answer for
    all of them. Then, a round at a time, a comment to one of the five:
    every viewer gets it once, in that content's entry, the four others
    empty at their cursors, the same bytes for all, at about one upstream
    answer per change. Last, a comment to each of the five at once: every
    viewer walks its cursors (each answer the next URL) until it has all
    five, each once, at no more upstream answers than changes (and a couple
    the cache let by)."""
    app, port, cache = behind_cache()
    auth = {"Authorization": token(1)}
    for content in FEEDS:
        request(port, "POST", f"/contents/{content}/comments", body={"body": f"hello {content}"},
                headers=auth)
    reversed_bare = f"/comments?feeds={','.join(map(str, reversed(FEEDS)))}"
    canonical_bare = f"/comments?feeds={','.join(map(str, FEEDS))}"

    # The redirect: to the canonical list, kept by the cache (it depends on the URL alone).
    redirects = [request(cache, "GET", reversed_bare) for _ in range(2)]
    for status, headers, _ in redirects:
        assert status == 307 and headers["location"] == canonical_bare
    assert redirects[1][1]["x-cache"].lower() == "hit"

    async def post(viewers, content, body):
        status, headers, raw = await viewers.send(
            "POST", f"http://127.0.0.1:{cache}/contents/{content}/comments", body={"body": body},
            headers=auth)
        assert status == 201 and headers["Cache-Control"] == "no-store", raw
        return json.loads(raw)

    async def walk_to(viewers, url, last):
        """One viewer from ``url`` until every feed's cursor is at ``last``'s:
        (every comment it got, as (content, id), in order; its answers)."""
        got, raws, cursors = [], [], None
        while cursors is None or any(cursors[c] < last[c] for c in last):
            _, status, headers, raw = await viewers.get(
                url if cursors is None else feeds_url(cache, cursors, 20))
            assert status == 200, raw
            assert headers["Cache-Control"] == SHARED
            answer = json.loads(raw)
            got += [(page["content_id"], c["id"]) for page in answer["feeds"]
                    for c in page["comments"]]
            raws.append(raw)
            cursors = next_cursors(answer)
        return got, raws

    async def finish(viewers, task, burst):
        """A held viewer's answer, then its walk on to every burst comment."""
        _, status, headers, raw = await task
        assert status == 200, raw
        answer = json.loads(raw)
        got = [(page["content_id"], c["id"]) for page in answer["feeds"]
               for c in page["comments"]]
        last = {c["content_id"]: c["seq"] for c in burst}
        cursors = next_cursors(answer)
        if all(cursors[c] >= last[c] for c in last):
            return got, [raw]
        more, raws = await walk_to(viewers, feeds_url(cache, cursors, 20), last)
        return got + more, [raw, *raws]

    async def scenario():
        viewers = Viewers()
        try:
            # Joining: the bare list in another order, the 307 followed.
            before = answers(port)
            joined = await asyncio.gather(*(viewers.get(f"http://127.0.0.1:{cache}"
                                                        f"{reversed_bare}")
                                            for _ in range(VIEWERS)))
            join_upstream = upstream_since(port, before)
            assert len({raw for *_, raw in joined}) == 1
            cursors = next_cursors(json.loads(joined[0][3]))
            assert sorted(cursors) == list(FEEDS)

            rounds = []
            for number in range(ROUNDS):
                content = FEEDS[number % len(FEEDS)]
                before = answers(port)
                held = await viewers.hold(feeds_url(cache, cursors, 20), VIEWERS, app)
                started = time.monotonic()
                comment = await post(viewers, content, f"round {number}")
                results = await asyncio.gather(*held)
                rounds.append((content, comment, cursors, started, results,
                               upstream_since(port, before)))
                cursors = {**cursors, content: comment["seq"]}

            # A comment to each of the five at once; the viewers walk to the last.
            before = answers(port)
            held = await viewers.hold(feeds_url(cache, cursors, 20), VIEWERS, app)
            burst = await asyncio.gather(*(post(viewers, content, f"burst {content}")
                                           for content in FEEDS))
            walks = await asyncio.gather(*(finish(viewers, task, burst) for task in held))
            return join_upstream, joined, rounds, burst, walks, upstream_since(port, before)
        finally:
            await viewers.close()

    join_upstream, joined, rounds, burst, walks, burst_upstream = asyncio.run(scenario())

    for _, status, headers, raw in joined:
        assert status == 200 and headers["Cache-Control"] == SHARED
        assert [page["content_id"] for page in json.loads(raw)["feeds"]] == list(FEEDS)
    print(f"\nMEASURED {VIEWERS} viewers joining five feeds through {behind_cache.name} "
          f"(307 to the canonical URL): upstream {join_upstream}")
    assert sum(join_upstream.values()) <= 3, join_upstream

    upstreams = []
    for content, comment, cursors, started, results, upstream in rounds:
        for done_at, status, headers, raw in results:
            assert status == 200, raw
            assert headers["Cache-Control"] == SHARED
            assert done_at >= started, "answered before the change: not held"
            answer = json.loads(raw)
            assert [page["content_id"] for page in answer["feeds"]] == list(FEEDS)
            for page in answer["feeds"]:
                if page["content_id"] == content:
                    assert [c["id"] for c in page["comments"]] == [comment["id"]], page
                    assert page["cursor"] == comment["seq"]
                else:
                    assert page["comments"] == [] and page["cursor"] == cursors[
                        page["content_id"]]
        assert len({raw for *_, raw in results}) == 1
        upstreams.append(upstream)
    report(f"{VIEWERS} viewers of five feeds through {behind_cache.name}, a comment a round",
           [done_at - started for *_, started, results, _ in rounds
            for done_at, *_ in results])
    print(f"MEASURED upstream feed answers per round ({ROUNDS} rounds, {VIEWERS} "
          f"deliveries each): {upstreams}")
    for upstream in upstreams:
        # One held request upstream per change: a couple more if the cache let one by.
        assert upstream.get("woken", 0) >= 1
        assert sum(upstream.values()) <= 3, upstream
    total = sum(sum(upstream.values()) for upstream in upstreams)
    assert total <= ROUNDS + 4, upstreams

    # The burst: each of the five comments once to every viewer, in content order.
    expected = sorted((c["content_id"], c["id"]) for c in burst)
    for got, _ in walks:
        assert sorted(got) == expected, got
    print(f"MEASURED {VIEWERS} viewers, a comment to each of five feeds at once through "
          f"{behind_cache.name}: {max(len(raws) for _, raws in walks)} answers each at most, "
          f"{len({tuple(raws) for _, raws in walks})} distinct walks, "
          f"upstream {burst_upstream}")
    assert burst_upstream.get("woken", 0) >= 1
    assert sum(burst_upstream.values()) <= len(FEEDS) + 2, burst_upstream
    assert app.hub.budget.held == 0


def test_timeout_cycles_cost_one_upstream_request_each_and_clients_pause(behind_cache):
    """Viewers held through the cache, holds ending empty: about one upstream
    request per hold, and clients honouring poll_after_ms never busy-loop."""
    app, port, cache = behind_cache(max_wait=2, default_wait=2, poll_interval=0.1)
    _, _, page = request(port, "GET", f"/contents/{CONTENT}/comments")
    cursor = page["cursor"]
    clients, duration, hold = 40, 7.0, 2.0

    async def client(viewers):
        requests, end = 0, time.monotonic() + duration
        while time.monotonic() < end:
            _, status, headers, raw = await viewers.get(feed_url(cache, cursor, 2))
            requests += 1
            page = json.loads(raw)
            assert status == 200 and page["comments"] == [] and page["cursor"] == cursor
            assert page["poll_after_ms"] == 1000
            assert headers["Cache-Control"] == SHARED
            await asyncio.sleep(page["poll_after_ms"] / 1000)
        return requests

    async def scenario():
        viewers = Viewers()
        try:
            return await asyncio.gather(*(client(viewers) for _ in range(clients)))
        finally:
            await viewers.close()

    before = answers(port)
    counts = asyncio.run(scenario())
    upstream = upstream_since(port, before)
    print(f"\nMEASURED {behind_cache.name}, {clients} clients over {duration:.0f} s of "
          f"{hold:.0f} s holds: "
          f"requests per client {min(counts)}..{max(counts)}, upstream {upstream}")
    # A hold upstream every hold + pause (3 s), or every hold: never per client.
    assert upstream.get("timeout", 0) >= 2
    assert sum(upstream.values()) <= duration / hold + 2, upstream
    # At most one request per pause (1 s), the first one aside: no busy loop.
    assert max(counts) <= duration + 1, counts


def test_health_writes_and_prefer_pass_through_the_cache(behind_cache, token):
    # No duplicate window: the same comment is posted twice on purpose.
    app, port, cache = behind_cache(duplicate_window=0)
    auth = {"Authorization": token(1)}

    # /healthz is the service's own, every time.
    status, headers, first = request(cache, "GET", "/healthz")
    assert status == 200 and headers["cache-control"] == "no-store"
    request(port, "GET", f"/contents/{CONTENT}/comments")
    _, _, second = request(cache, "GET", "/healthz")
    assert second["answers"]["latest"] == first["answers"]["latest"] + 1

    # Writes reach the service every time, and are never kept.
    bodies = []
    for n in range(2):
        status, headers, comment = request(cache, "POST", f"/contents/{CONTENT}/comments",
                                           body={"body": f"same {n // 2}"}, headers=auth)
        assert status == 201 and headers["cache-control"] == "no-store"
        bodies.append(comment)
    assert bodies[0]["id"] != bodies[1]["id"]
    status, headers, _ = request(cache, "DELETE",
                                 f"/contents/{CONTENT}/comments/{bodies[0]['id']}", headers=auth)
    assert status == 204
    status, _, _ = request(cache, "DELETE",
                           f"/contents/{CONTENT}/comments/{bodies[0]['id']}", headers=auth)
    assert status == 204  # the service answered again (deleting twice is idempotent)
    assert app.store.get_comment(CONTENT, bodies[0]["id"]).deleted

    # A Prefer hold is a variant of its own (Vary: Prefer).
    latest = f"/contents/{CONTENT}/comments?limit=3"
    _, preferred, _ = request(cache, "GET", latest, headers={"Prefer": "wait=1"})
    _, plain, _ = request(cache, "GET", latest)
    _, plain_again, _ = request(cache, "GET", latest)
    assert preferred["preference-applied"] == "wait=1"
    assert "preference-applied" not in plain and "preference-applied" not in plain_again
    assert plain_again["x-cache"].lower() == "hit"


def test_shed_answers_are_not_shared_and_the_url_collapses_again(behind_cache, token):
    """A shed answer reaches only the viewer it was for; the viewers waiting
    with it ask again, each shed in turn while the budget is spent (behind
    nginx as their 500 ms lock polls come round); once a slot is free the
    URL is one held request again, not one per viewer (no hit-for-miss)."""
    app, port, cache = behind_cache(threads=4, hold_budget=1, max_wait=5)
    _, _, page = request(port, "GET", f"/contents/{CONTENT}/comments")
    cursor, url = page["cursor"], feed_url(cache, page["cursor"], 20)
    shed_viewers = 5

    async def scenario():
        viewers = Viewers()
        try:
            # Another content's viewer, held directly for 5 s, spends the budget.
            other = asyncio.create_task(viewers.get(
                f"http://127.0.0.1:{port}/contents/{CONTENT + 1}/comments?since=0&wait=5"))
            while app.hub.budget.held < 1:
                await asyncio.sleep(0.02)
            before = answers(port)
            started = time.monotonic()
            shed = await asyncio.gather(*(viewers.get(url) for _ in range(shed_viewers)))
            shed_phase = time.monotonic() - started, upstream_since(port, before)
            assert not other.done(), "the budget was free before every viewer was shed"
            await other
            before = answers(port)
            held = await viewers.hold(url, 100, app)
            status, _, raw = await viewers.send(
                "POST", f"http://127.0.0.1:{port}/contents/{CONTENT}/comments",
                body={"body": "after the shedding"}, headers={"Authorization": token(1)})
            assert status == 201, raw
            return shed, shed_phase, await asyncio.gather(*held), upstream_since(port, before)
        finally:
            await viewers.close()

    shed, (seconds, shed_upstream), held, upstream = asyncio.run(scenario())
    print(f"\nMEASURED {shed_viewers} viewers shed through {behind_cache.name} in "
          f"{seconds * 1000:.0f} ms, "
          f"upstream {shed_upstream}; then 100 held: upstream {upstream}")
    for _, status, headers, raw in shed:
        page = json.loads(raw)
        assert status == 200 and page["poll_after_ms"] > 0 and page["cursor"] == cursor
        assert headers["Cache-Control"] == "no-store"
    assert shed_upstream == {"shed": shed_viewers}  # each its own, none shared
    for _, status, _, raw in held:
        assert status == 200 and [c["body"] for c in json.loads(raw)["comments"]] == [
            "after the shedding"]
    assert sum(upstream.values()) <= 3, upstream


class FakeStream:
    """Stands in for the event stream route still to come, in front of the
    app: one event at once, the next only when :attr:`release` is set."""

    PATH = re.compile(r"/(contents/[0-9]+/)?comments/stream")

    def __init__(self, app):
        self.app = app
        self.settings = app.settings  # what make_server reads
        self.release = threading.Event()
        self.opened = 0

    def __call__(self, environ, start_response):
        if not self.PATH.fullmatch(environ["PATH_INFO"]):
            return self.app(environ, start_response)
        self.opened += 1
        start_response("200 OK", [("Content-Type", "text/event-stream"),
                                  ("Cache-Control", "no-store")])
        return self._events()

    def _events(self):
        yield b"data: first\n\n"
        self.release.wait(10)
        yield b"data: second\n\n"


def test_the_event_stream_routes_pass_through_unbuffered(behind_cache):
    """One feed's stream and several feeds' (``/comments/stream?feeds=``)."""
    streams = []
    app, port, cache = behind_cache(wrap=lambda app: streams.append(FakeStream(app)) or streams[0])
    (stream,) = streams
    urls = [f"http://127.0.0.1:{cache}/contents/{CONTENT}/comments/stream",
            f"http://127.0.0.1:{cache}/comments/stream?feeds={CONTENT},{CONTENT + 1}"]

    async def viewer(viewers, url):
        async with viewers.session.get(url) as resp:
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
            while not stream.release.is_set():
                await asyncio.sleep(0.02)
            return resp.status, first, await asyncio.wait_for(resp.content.read(), 5)

    async def scenario():
        viewers = Viewers()
        try:
            tasks = [asyncio.create_task(viewer(viewers, url)) for url in urls for _ in range(2)]
            deadline = time.monotonic() + 10
            while stream.opened < 4:
                assert time.monotonic() < deadline, "the stream did not reach the service"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            # Both viewers have their first event while the stream is still open.
            assert not any(task.done() for task in tasks)
            stream.release.set()
            return await asyncio.gather(*tasks)
        finally:
            stream.release.set()
            await viewers.close()

    for status, first, rest in asyncio.run(scenario()):
        assert (status, first, rest) == (200, b"data: first\n\n", b"data: second\n\n")
    assert stream.opened == 4  # one upstream stream per viewer, never shared


# -- moderation behind the caches (PostgreSQL) -----------------------------------

MODERATOR = 99
SPAMMER = 7
BYSTANDER = 8
SPAM = 20
#: Changes per page in the moderation tests: the viewers walk three pages
#: (8, 8, 6) from the hold to the ban, each page one URL for all of them.
PAGE = 8
OPEN_ROOM = {"closed": False, "slow_mode_seconds": 0, "pinned": None}


def page_url(port, since, wait):
    return f"{feed_url(port, since, wait)}&limit={PAGE}"


def in_seq_order(page):
    """A page's comments and events, merged as the feed has them (by seq)."""
    return sorted(page["comments"] + page["events"], key=lambda change: change["seq"])


async def walk(viewers, cache, raw, last):
    """What one viewer sees from its answer ``raw`` on, following its cursor
    through the cache until ``last``: (changes in order, raw answers)."""
    answers_ = [raw]
    page = json.loads(raw)
    seen = in_seq_order(page)
    while page["cursor"] < last:
        _, status, headers, raw = await viewers.get(page_url(cache, page["cursor"], 20))
        assert status == 200, raw
        assert headers["Cache-Control"] == SHARED
        answers_.append(raw)
        page = json.loads(raw)
        assert page["comments"] or page["events"], f"an empty page at {page['cursor']}"
        seen += in_seq_order(page)
    return seen, answers_


@pytest.mark.postgres
def test_a_ban_with_retraction_and_a_closing_reach_500_viewers_through_the_cache(
        behind_cache, pg_url, token):
    """A spammer's 20 comments, one of them pinned; 500 viewers held at one
    cursor through the cache; a moderator bans the spammer with retraction,
    through the cache. Every viewer, walking its cursor (8 changes a page),
    sees each tombstone once, in comment order, then the unpinning, then the
    ban, and ends on the same room as everyone; upstream that is one answer
    per page URL, not per viewer. Then the moderator closes the content
    through the cache: the viewers held at the ban's seq are answered with
    the closed room (and its long pause), one upstream answer again, and a
    stream through the cache names the room, then ``closed``, and ends."""
    app, port, cache = behind_cache(database=pg_url)
    comments = f"/contents/{CONTENT}/comments"
    mod = {"Authorization": token(MODERATOR, "moderator")}
    spam = [request(port, "POST", comments, body={"body": f"buy now {n}"},
                    headers={"Authorization": token(SPAMMER)})[2] for n in range(SPAM)]
    fine = request(port, "POST", comments, body={"body": "a real comment"},
                   headers={"Authorization": token(BYSTANDER)})[2]
    status, _, _ = request(port, "PATCH", f"/contents/{CONTENT}/room", headers=mod,
                           body={"slow_mode_seconds": 30, "pinned_comment_id": spam[3]["id"]})
    assert status == 200
    _, _, latest = request(port, "GET", comments)
    cursor = latest["cursor"]
    assert latest["room"]["pinned"]["id"] == spam[3]["id"]
    # 20 tombstones, the unpinning, the ban: one transaction.
    last = cursor + SPAM + 2

    async def scenario():
        viewers = Viewers()
        try:
            before = answers(port)
            held = await viewers.hold(page_url(cache, cursor, 20), VIEWERS, app)
            status, headers, raw = await viewers.send(
                "POST", f"http://127.0.0.1:{cache}/contents/{CONTENT}/bans", headers=mod,
                body={"author_id": SPAMMER, "retract": True, "reason": "spam"})
            assert status == 201, raw
            assert headers["Cache-Control"] == "no-store"
            ban = json.loads(raw)
            results = await asyncio.gather(*held)
            for _, status, headers, raw in results:
                assert status == 200, raw
                assert headers["Cache-Control"] == SHARED
            walks = await asyncio.gather(*(walk(viewers, cache, raw, last)
                                           for *_, raw in results))
            banned = ban, walks, upstream_since(port, before)
            room = request(port, "GET", f"/contents/{CONTENT}/room")[2]  # before the closing

            # Closing: held at the ban's seq, the stream opened once they are.
            before = answers(port)
            held = await viewers.hold(page_url(cache, last, 20), VIEWERS, app)
            stream = SSEClient(cache, f"{comments}/stream")
            try:
                assert stream.head() == 200
                opened = stream.next_event()
                deadline = time.monotonic() + 10
                while app.hub.budget.streams < 1:
                    assert time.monotonic() < deadline, "the stream did not reach the service"
                    await asyncio.sleep(0.02)
                status, headers, raw = await viewers.send(
                    "PATCH", f"http://127.0.0.1:{cache}/contents/{CONTENT}/room", headers=mod,
                    body={"closed": True})
                assert status == 200, raw
                assert headers["Cache-Control"] == "no-store"
                closed = json.loads(raw)
                results = await asyncio.gather(*held)
                streamed = [opened] + [e for e in stream.until_end(timeout=10)
                                       if e.event != "keepalive"]
            finally:
                stream.close()
            return (*banned, room), (closed, results, streamed, upstream_since(port, before))
        finally:
            await viewers.close()

    (ban, walks, ban_upstream, room), (closed, results, streamed, close_upstream) = asyncio.run(
        scenario())

    # Every viewer: each tombstone once, in comment order, the unpinning, the ban.
    assert ban["retracted"] == SPAM and ban["author_id"] == SPAMMER
    expected = [(c["id"], None, cursor + 1 + n) for n, c in enumerate(spam)] + [
        (None, "room", last - 1), (None, "ban", last)]
    rooms, pages = set(), set()
    for seen, raws in walks:
        assert [(c.get("id"), c.get("type"), c["seq"]) for c in seen] == expected
        assert all(c["deleted"] and c["body"] is None for c in seen[:SPAM])
        assert seen[SPAM]["room"]["pinned"] is None
        assert seen[-1]["author_id"] == SPAMMER and seen[-1]["retracted"] == SPAM
        final = json.loads(raws[-1])
        assert final["cursor"] == last and final["poll_after_ms"] == 0
        rooms.add(json.dumps(final["room"], sort_keys=True))
        pages.add(tuple(raws))
    assert len(pages) == 1, "viewers at one cursor got different answers"
    assert room == {"closed": False, "slow_mode_seconds": 30, "pinned": None}
    assert rooms == {json.dumps(room, sort_keys=True)}
    print(f"\nMEASURED {VIEWERS} viewers through {behind_cache.name}, a ban retracting "
          f"{SPAM} comments in {len(walks[0][1])} pages: upstream {ban_upstream}")
    # One upstream answer per page URL (a couple more if the cache let one
    # by): never one per viewer.
    assert ban_upstream.get("woken", 0) >= 1
    assert sum(ban_upstream.values()) <= len(walks[0][1]) + 2, ban_upstream

    # The closing: the closed room, once, to everyone; nothing else changed.
    assert closed == {**room, "closed": True}
    for _, status, headers, raw in results:
        assert status == 200 and headers["Cache-Control"] == SHARED
        page = json.loads(raw)
        assert page["comments"] == [] and page["cursor"] == last + 1
        assert [(e["type"], e["seq"], e["room"]) for e in page["events"]] == [
            ("room", last + 1, closed)]
        assert page["room"] == closed and page["poll_after_ms"] == 300000
    assert len({raw for *_, raw in results}) == 1
    print(f"MEASURED {VIEWERS} viewers through {behind_cache.name}, the closing: "
          f"upstream {close_upstream}")
    assert close_upstream.get("woken", 0) >= 1
    assert sum(close_upstream.values()) <= 3, close_upstream
    assert [(e.event, e.id) for e in streamed] == [
        ("room", last), ("room", last + 1), ("closed", last + 1)]
    assert streamed[0].json == room and streamed[1].json == streamed[2].json == closed

    # Closed, through the cache: posts refused, a stream asked is 204.
    status, _, error = request(cache, "POST", comments, body={"body": "too late"},
                               headers={"Authorization": token(BYSTANDER)})
    assert (status, error["code"]) == (409, "closed")
    again = SSEClient(cache, f"{comments}/stream")
    try:
        assert again.head() == 204
    finally:
        again.close()
    # The bystander's comment stands; the spam is gone from the latest page.
    _, _, latest = request(port, "GET", comments)
    assert [c["id"] for c in latest["comments"]] == [fine["id"]]
    assert app.hub.budget.held == 0


@pytest.mark.postgres
def test_the_moderation_routes_are_never_kept_by_the_cache(behind_cache, pg_url, token):
    """GET /room and GET /bans through the cache, twice around each change
    made through it: every answer is the service's own, as of now (no-store
    on each), and a moderator's list is never handed to anyone else."""
    app, port, cache = behind_cache(database=pg_url)
    room_path, bans_path = f"/contents/{CONTENT}/room", f"/contents/{CONTENT}/bans"
    mod = {"Authorization": token(MODERATOR, "moderator")}

    def read(path, headers=None):
        """The same GET twice through the cache: both answers, checked alike."""
        got = [request(cache, "GET", path, headers=headers) for _ in range(2)]
        for status, headers_, _ in got:
            assert status == 200 and headers_["cache-control"] == "no-store"
            assert headers_.get("x-cache", "pass").lower() != "hit"
        assert got[0][2] == got[1][2]
        return got[0][2]

    def write(method, path, body=None):
        status, headers, document = request(cache, method, path, body=body, headers=mod)
        assert status in (200, 201, 204), document
        assert headers["cache-control"] == "no-store"
        return document

    assert read(room_path) == OPEN_ROOM
    assert read(bans_path, mod) == {"content_id": CONTENT, "bans": []}
    comment = request(port, "POST", f"/contents/{CONTENT}/comments", body={"body": "pin me"},
                      headers={"Authorization": token(BYSTANDER)})[2]

    slow = write("PATCH", room_path, {"slow_mode_seconds": 10})
    assert read(room_path) == slow == {**OPEN_ROOM, "slow_mode_seconds": 10}
    pinned = write("PATCH", room_path, {"pinned_comment_id": comment["id"]})
    assert read(room_path) == pinned and pinned["pinned"]["id"] == comment["id"]
    closed = write("PATCH", room_path, {"closed": True})
    assert read(room_path) == closed == {**pinned, "closed": True}
    assert read(room_path) == request(port, "GET", room_path)[2]

    ban = write("POST", bans_path, {"author_id": SPAMMER, "seconds": 600})
    assert read(bans_path, mod) == {"content_id": CONTENT, "bans": [ban]}
    # The moderator's list is theirs: no token through the cache is 401.
    status, headers, error = request(cache, "GET", bans_path)
    assert (status, error["code"]) == (401, "unauthorized")
    assert headers["cache-control"] == "no-store"
    write("DELETE", f"{bans_path}/{SPAMMER}")
    assert read(bans_path, mod) == {"content_id": CONTENT, "bans": []}
    write("PATCH", room_path, {"closed": False, "slow_mode_seconds": 0, "pinned_comment_id": None})
    assert read(room_path) == OPEN_ROOM


def test_the_cache_answers_a_conditional_read_with_304(behind_cache, token):
    """A metered client's If-None-Match is answered by the cache from its
    copy (the service's ETag), 304 and no body, without going upstream."""
    app, port, cache = behind_cache()
    status, _, _ = request(port, "POST", f"/contents/{CONTENT}/comments",
                           body={"body": "tagged"}, headers={"Authorization": token(7)})
    assert status == 201
    path = f"/contents/{CONTENT}/comments?since=0&wait=0"
    status, headers, page = request(cache, "GET", path)
    assert status == 200 and len(page["comments"]) == 1
    etag = headers["etag"]
    before = answers(port)
    conn = http.client.HTTPConnection("127.0.0.1", cache, timeout=10)
    try:
        conn.request("GET", path, headers={"If-None-Match": etag})
        resp = conn.getresponse()
        assert resp.status == 304 and resp.read() == b""
        assert resp.getheader("ETag") == etag
    finally:
        conn.close()
    assert upstream_since(port, before) == {}  # the cache's own answer
