"""A live event: V viewers over C contents, R comments/s for D seconds.

The viewers (a keep-alive :class:`~.connection.Connection` each; the
writer on aiohttp) are spread evenly
over the contents and follow theirs as the browser client does: the
latest page, then long-polls from its cursor, pausing poll_after_ms when
asked. Once all have a cursor and --settle seconds have passed, the
writer posts R comments a second, round robin over the contents, for D
seconds; the run ends --tail seconds after the last post.

Checked: every viewer got every comment of its content exactly once (a
comment seen twice is a duplicate; one never seen is missing). Measured:
latency from just before each POST to each viewer's answer carrying it
(p50/p99/max), the viewers' requests/s, the posts' round trip, and the
server's CPU seconds and peak RSS (all its processes).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import tempfile
import time
import uuid

import aiohttp
from yarl import URL

from . import server, table
from .common import BenchRun, counts, mint_token, progress, raise_open_files, run_async
from .connection import ERRORS, Connection
from .database import fresh_database
from .load import session
from .table import percentile


def add_arguments(parser):
    parser.add_argument("--viewers", default="2000", type=counts,
                        help="comma-separated V values, a run each (default %(default)s)")
    parser.add_argument("--contents", type=int, default=4, help="contents (default 4)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="comments per second, over all contents (default 20)")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of posting (default 60)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds after every viewer has a cursor (default 2)")
    parser.add_argument("--tail", type=float, default=5.0,
                        help="seconds kept after the last post (default 5)")
    parser.add_argument("--workers", type=int, default=1,
                        help="serve --workers K (PostgreSQL; default 1)")


def run(args):
    raise_open_files(max(args.viewers) + 256)
    return run_async(lambda loop: Event(args, loop).run())


class Viewer:
    __slots__ = ("content", "cursor", "seen", "duplicates", "errors")

    def __init__(self, content):
        self.content = content
        self.cursor = None
        self.seen = {}  # comment body -> arrival (perf_counter)
        self.duplicates = 0
        self.errors = 0  # requests that failed or answered no page


class Event(BenchRun):
    command = "event"

    async def run(self):
        args = self.args
        progress(f"event: V={','.join(map(str, args.viewers))} over {args.contents} contents, "
                 f"{args.rate:g} comments/s for {args.duration:g} s; client loop "
                 f"{self.loop_name}")
        for v in args.viewers:
            row = await self.one(v)
            self.rows.append(row)
            progress(table.text_row(row, COLUMNS))
        print(table.text_table(self.rows, COLUMNS))
        document = {**table.run_info("event", args.argv, args.label),
                    "client_loop": self.loop_name,
                    "database": "postgresql" if args.database_url else "sqlite",
                    "workers": args.workers,
                    "settings": {k: v for k, v in vars(self.settings).items() if k != "secret"},
                    "rows": self.rows}
        path = args.json or args.results_dir / f"event-{self.stamp}.json"
        progress(f"written: {table.write_json(path, document)}")
        return 0 if all(r["missing"] == 0 and r["duplicates"] == 0 for r in self.rows) else 1

    async def one(self, v):
        flags = list(self.flags)
        if self.args.workers > 1:
            flags += ["--workers", str(self.args.workers)]
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            database = fresh_database(self.args.database_url, tmp)
            try:
                database.create(self.env)
                with server.service(database.url, flags, env=self.env,
                                    log_path=self.log_path(f"V{v}")) as service:
                    return await self.measure(v, service)
            finally:
                database.drop()

    async def measure(self, v, service):
        args = self.args
        viewers = [Viewer(1 + i % args.contents) for i in range(v)]
        requests = [0]
        sent = {}  # body -> (content, perf_counter before the POST)
        post_ms = []
        peak_rss = [0.0]
        async with session(timeout=60) as http:
            tasks = [asyncio.create_task(follow(http, service.url, viewer, requests, i))
                     for i, viewer in enumerate(viewers)]
            sampler = asyncio.create_task(sample_rss(service, peak_rss))
            try:
                deadline = time.perf_counter() + 60
                while any(x.cursor is None for x in viewers) and time.perf_counter() < deadline:
                    await asyncio.sleep(0.2)
                await asyncio.sleep(args.settle)
                before, start_requests = service.usage(), requests[0]
                started = time.perf_counter()
                await post_all(http, service.url, mint_token(self.env), args, sent, post_ms)
                await asyncio.sleep(args.tail)
                seconds = time.perf_counter() - started
                after, done_requests = service.usage(), requests[0] - start_requests
            finally:
                for task in [*tasks, sampler]:
                    task.cancel()
                await asyncio.gather(*tasks, sampler, return_exceptions=True)
        latencies, missing, expected = [], 0, 0
        for viewer in viewers:
            for body, (content, when) in sent.items():
                if content != viewer.content:
                    continue
                expected += 1
                arrived = viewer.seen.get(body)
                if arrived is None:
                    missing += 1
                else:
                    latencies.append((arrived - when) * 1e3)
        return {
            "V": v, "contents": args.contents, "rate": args.rate, "duration_s": args.duration,
            "workers": args.workers, "posts": len(sent), "expected": expected,
            "delivered": len(latencies), "missing": missing,
            "duplicates": sum(x.duplicates for x in viewers),
            "viewer_errors": sum(x.errors for x in viewers),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies, default=None),
            "cdf_ms": [percentile(latencies, p) for p in range(1, 101)],
            "requests_per_s": done_requests / seconds,
            "post_p99_ms": percentile(post_ms, 99),
            "cpu_s": after.cpu_s - before.cpu_s, "cpu_share": (after.cpu_s - before.cpu_s) / seconds,
            "peak_rss_mb": peak_rss[0],
        }


async def follow(http, base_url, viewer, requests, index):
    """Follow the viewer's content; note each comment's first arrival, count repeats."""
    await asyncio.sleep(index // 200 * 0.1)  # connect in batches
    base = URL(base_url)
    path = f"/contents/{viewer.content}/comments"
    # Pages past the service's gzip threshold come compressed, as a browser asks.
    headers = {"Accept-Encoding": "gzip"}
    conn = None
    try:
        while True:
            target = f"{path}?wait=0" if viewer.cursor is None else f"{path}?since={viewer.cursor}"
            try:
                if conn is None or conn.closed:
                    conn = await Connection.open(base.host, base.port)
                resp = await conn.get(target, headers, timeout=60)
                raw = resp.body
                if resp.headers.get("content-encoding") == "gzip":
                    raw = gzip.decompress(raw)
                page = json.loads(raw)
            except (*ERRORS, ValueError):
                viewer.errors += 1
                if conn is not None:
                    conn.close()
                await asyncio.sleep(1.0)
                continue
            arrived = resp.arrived
            await _page(viewer, page, arrived, requests)
    finally:
        if conn is not None:
            conn.close()


async def _page(viewer, page, arrived, requests):
    """Take one answer: its comments, its cursor, its pause."""
    requests[0] += 1
    await asyncio.sleep(0)  # let the viewers answered with this one read the clock
    if "cursor" not in page:
        viewer.errors += 1
        await asyncio.sleep(1.0)  # an error document: 503 while draining, say
        return
    if viewer.cursor is not None:  # the first page is history, not the event's
        for comment in page["comments"]:
            body = comment.get("body")
            if body in viewer.seen:
                viewer.duplicates += 1
            elif body is not None:
                viewer.seen[body] = arrived
    viewer.cursor = page["cursor"]
    if page["poll_after_ms"]:
        await asyncio.sleep(page["poll_after_ms"] / 1000)


async def post_all(http, base_url, token, args, sent, post_ms):
    """R posts a second for D seconds, each on its own schedule (a slow one
    does not hold back the next)."""
    tag = uuid.uuid4().hex[:8]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    total = int(args.rate * args.duration)
    first = time.perf_counter()

    async def one(k):
        await asyncio.sleep(max(0.0, first + k / args.rate - time.perf_counter()))
        content = 1 + k % args.contents
        body = f"event {tag} comment {k}"
        sent[body] = (content, time.perf_counter())
        try:
            async with http.post(f"{base_url}/contents/{content}/comments", headers=headers,
                                 data=json.dumps({"body": body})) as resp:
                await resp.read()
                ok = resp.status == 201
        except (TimeoutError, aiohttp.ClientError):
            ok = False
        if ok:
            post_ms.append((time.perf_counter() - sent[body][1]) * 1e3)
        else:
            del sent[body]  # not stored: nobody should get it

    await asyncio.gather(*(one(k) for k in range(total)))


async def sample_rss(service, peak):
    while True:
        peak[0] = max(peak[0], service.usage().rss_mb)
        await asyncio.sleep(1.0)


Column = table.Column
COLUMNS = [
    Column("V", "V", width=5), Column("contents", "contents"), Column("posts", "posts"),
    Column("deliv/exp", lambda r: f"{r['delivered']}/{r['expected']}", width=13),
    Column("missing", "missing"), Column("dupes", "duplicates"),
    Column("errors", "viewer_errors"),
    Column("p50 ms", "p50_ms"), Column("p99 ms", "p99_ms"), Column("max ms", "max_ms"),
    Column("req/s", "requests_per_s"), Column("POST p99 ms", "post_p99_ms"),
    Column("CPU s", "cpu_s", 1), Column("CPU share", "cpu_share", 2),
    Column("peak RSS MB", "peak_rss_mb"),
]
