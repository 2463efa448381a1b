"""Several service hosts behind one cache: a host killed and started again.

Two ``python -m service serve`` processes on separate ports over one
PostgreSQL schema and one NOTIFY channel, in shared-cache mode, behind real
Varnish (the shipped VCL's director over both) or nginx (the shipped site's
upstream of both). 500 viewers long-poll one content through the cache; a
writer posts through it at 10 comments/s, each comment with an
Idempotency-Key, again after a 503's ``Retry-After`` with the same key.
Mid-run one host is killed (SIGKILL) and, seconds later, started again on
its port. Then: every viewer got every accepted comment exactly once, in
order, without an error; every write was a 201 (perhaps after 503s); the
database holds exactly the accepted comments. Run with ``-s`` to see the
counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import aiohttp
import pytest
import sqlalchemy as sa
from conftest import notify_channel_for
from proxies import NGINX, VARNISHD, start_nginx, start_varnish
from test_caches import require
from test_serve import REPO, SECRET, free_port, get

from service.serve.server import raise_open_file_limit
from service.web.auth import TokenSigner

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CONTENT = 42
VIEWERS = 500
RATE = 10  # comments per second
WRITE_SECONDS = 16
KILL_AT = 5  # seconds into the writing
RESTART_AFTER = 4  # seconds dead
CACHES = {"varnish": (VARNISHD, start_varnish), "nginx": (NGINX, start_nginx)}


class Host:
    """One service process on its own port; :meth:`kill` and :meth:`start` again."""

    def __init__(self, name, database_url, workdir):
        self.name = name
        self.port = free_port()
        self.log = workdir / f"{name}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOMMENTS_")}
        self.env.update(
            PYTHONPATH=str(REPO), LIVECOMMENTS_SECRET=SECRET, LIVECOMMENTS_PORT=str(self.port),
            LIVECOMMENTS_DATABASE_URL=database_url,
            LIVECOMMENTS_NOTIFY_CHANNEL=notify_channel_for(database_url),
            LIVECOMMENTS_SHARED_CACHE_SECONDS="1", LIVECOMMENTS_POST_RATE="0",
            LIVECOMMENTS_TRUSTED_PROXIES="127.0.0.1", LIVECOMMENTS_THREADS="100",
            LIVECOMMENTS_SHUTDOWN_DRAIN="0.5")
        self.workdir = workdir
        self.proc = None
        self.start()

    def start(self):
        with self.log.open("a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"],
                                         cwd=self.workdir, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(self.port, "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{self.name} did not come up"
            time.sleep(0.1)

    def held(self):
        try:
            return get(self.port, "/healthz", timeout=2)[2]["held"]
        except OSError:
            return 0

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def pg_database(pg_url, make_store):
    make_store(pg_url)  # creates the schema's tables, as init-db would
    return pg_url


@pytest.fixture(params=sorted(CACHES))
def two_hosts(request, pg_database, tmp_path):
    """(hosts, cache): two service processes over one database, the cache
    this test runs with in front of both."""
    binary, start = CACHES[request.param]
    require(binary)
    raise_open_file_limit(4 * VIEWERS + 1024)
    hosts = []
    cache = None
    try:
        hosts = [Host(f"host{n}", pg_database, tmp_path) for n in (1, 2)]
        workdir = tmp_path / request.param
        workdir.mkdir()
        cache = start(workdir, [host.port for host in hosts])
        yield hosts, cache
    finally:
        if cache is not None:
            cache.stop()
        for host in hosts:
            host.stop()


class Run:
    """What the viewers and the writer saw."""

    def __init__(self):
        self.accepted = {}  # comment id: seq, from 201 answers
        self.writes = Counter()  # 201, 201 replayed, 503, retries, ...
        self.write_failures = []
        self.received = [[] for _ in range(VIEWERS)]  # comment ids, per viewer
        self.reads = Counter()
        self.read_failures = []
        self.final_seq = None  # set when the writing is over


async def viewer(session, base, cursor, got, run):
    """Long-polls from ``cursor`` until it has the last accepted comment."""
    while run.final_seq is None or cursor < run.final_seq:
        url = f"{base}/contents/{CONTENT}/comments?since={cursor}&wait=20"
        try:
            async with session.get(url) as resp:
                status, headers, raw = resp.status, resp.headers, await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            run.reads["client error"] += 1
            run.read_failures.append(repr(exc))
            await asyncio.sleep(1)
            continue
        run.reads[status] += 1
        if status != 200:
            run.read_failures.append((status, raw[:200]))
            await asyncio.sleep(float(headers.get("Retry-After", 1)))
            continue
        page = json.loads(raw)
        got.extend(comment["id"] for comment in page["comments"])
        cursor = page["cursor"]
        if page.get("poll_after_ms"):
            await asyncio.sleep(page["poll_after_ms"] / 1000)


async def write(session, base, n, auth, run):
    """Comment ``n`` with a key of its own, sent until it is accepted (again
    after a 503's Retry-After), or a failure that is not a 503."""
    headers = {"Authorization": auth, "Idempotency-Key": str(uuid.uuid4())}
    for attempt in range(30):
        if attempt:
            run.writes["retries"] += 1
        try:
            async with session.post(f"{base}/contents/{CONTENT}/comments",
                                    json={"body": f"comment {n}"}, headers=headers) as resp:
                status, answer, raw = resp.status, resp.headers, await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            run.write_failures.append((n, repr(exc)))
            return
        if status == 201:
            comment = json.loads(raw)
            run.accepted[comment["id"]] = comment["seq"]
            run.writes["201 replayed" if answer.get("Idempotent-Replayed") else "201"] += 1
            return
        if status == 503 and "Retry-After" in answer:
            run.writes["503"] += 1
            await asyncio.sleep(float(answer["Retry-After"]))
            continue
        run.write_failures.append((n, status, raw[:300]))
        return
    run.write_failures.append((n, "still 503 after 30 tries"))


def holding(hosts, timeout=2):
    """The host holding the viewers' request (one host at a time holds a
    feed URL's fetch), else the first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for host in hosts:
            if host.held():
                return host
    return hosts[0]


async def scenario(hosts, cache, run):
    base = f"http://127.0.0.1:{cache.port}"
    auth = f"Bearer {TokenSigner(SECRET).mint(1)}"
    timeout = aiohttp.ClientTimeout(total=40)
    viewers = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
    writer = aiohttp.ClientSession(timeout=timeout)
    try:
        async with viewers.get(f"{base}/contents/{CONTENT}/comments?wait=0") as resp:
            cursor = json.loads(await resp.read())["cursor"]
        tasks = [asyncio.create_task(viewer(viewers, base, cursor, got, run))
                 for got in run.received]
        await asyncio.sleep(3)  # the viewers are held
        started = time.monotonic()
        writes, killed, restarted, n = [], None, None, 0
        while (now := time.monotonic()) < started + WRITE_SECONDS:
            if killed is None and now >= started + KILL_AT:
                killed = await asyncio.to_thread(holding, hosts)
                killed.kill()
            elif restarted is None and now >= started + KILL_AT + RESTART_AFTER:
                restarted = asyncio.create_task(asyncio.to_thread(killed.start))
            writes.append(asyncio.create_task(write(writer, base, n, auth, run)))
            n += 1
            await asyncio.sleep(max(0.0, started + n / RATE - time.monotonic()))
        await asyncio.gather(*writes, restarted)
        run.final_seq = max(run.accepted.values(), default=cursor)
        done, pending = await asyncio.wait(tasks, timeout=60)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()
        return killed, len(pending)
    finally:
        await viewers.close()
        await writer.close()


def cache_retries(cache):
    """What the cache says about its retries: Varnish's counters, nginx's log."""
    if cache.name == "varnish":
        out = subprocess.run(["varnishstat", "-n", str(cache.workdir / "varnish"), "-1"],
                             capture_output=True, text=True, timeout=20).stdout
        return {m[1]: int(m[2]) for m in re.finditer(r"^MAIN\.((?:backend|fetch)_\w+)\s+(\d+)",
                                                    out, re.MULTILINE) if int(m[2])}
    log = (cache.workdir / "error.log").read_text()
    return dict(Counter(re.findall(r"connect\(\) failed|upstream prematurely closed|"
                                   r"upstream server temporarily disabled|no live upstreams",
                                   log)))


def test_a_host_killed_mid_run_loses_nothing(two_hosts, pg_database):
    hosts, cache = two_hosts
    run = Run()
    killed, unfinished = asyncio.run(scenario(hosts, cache, run))
    engine = sa.create_engine(pg_database)
    try:
        with engine.connect() as conn:
            stored = conn.execute(sa.text(
                "SELECT id, seq FROM comments WHERE content_id = :content ORDER BY seq"),
                {"content": CONTENT}).all()
    finally:
        engine.dispose()
    deliveries = sum(len(got) for got in run.received)
    print(f"\nMEASURED {cache.name}, 2 hosts, {killed.name} killed (SIGKILL) {KILL_AT} s in "
          f"and started again {RESTART_AFTER} s later: {VIEWERS} viewers, "
          f"{len(run.accepted)} comments accepted, {deliveries} deliveries "
          f"({deliveries / max(1, VIEWERS * len(run.accepted)):.1%} of viewers × comments); "
          f"writes {dict(run.writes)}; viewer reads {dict(run.reads)}; "
          f"cache {cache_retries(cache)}")
    assert not run.write_failures, run.write_failures[:10]
    assert not unfinished, f"{unfinished} viewers never got the last comment"
    # Nothing lost, nothing doubled: the database has the accepted comments.
    assert {comment_id for comment_id, _ in stored} == set(run.accepted)
    assert len(run.accepted) >= RATE * WRITE_SECONDS * 0.5
    # Every viewer got every comment once, in order, and never an error:
    # a request held on the killed host was answered through the other.
    expected = [comment_id for comment_id, _ in stored]
    wrong = [got for got in run.received if got != expected]
    assert not wrong, (f"{len(wrong)} viewers got other comments than the {len(expected)} "
                       f"accepted, e.g. {len(wrong[0])} of them, "
                       f"{len(wrong[0]) - len(set(wrong[0]))} twice")
    assert not run.read_failures, (len(run.read_failures), run.read_failures[:5])
