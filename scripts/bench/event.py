"""A live event: V viewers over C contents, R comments/s for D seconds, through each --via.

The viewers (a keep-alive :class:`~.connection.Connection` each) are
spread evenly over the contents and follow theirs as the browser client
does: the latest page, then long-polls from its cursor, pausing
poll_after_ms when asked. Once all have a cursor and --settle seconds have
passed, the writer posts R comments a second, round robin over the
contents, for D seconds; the run ends --tail seconds after the last post.

--via picks what the viewers talk to, each in turn in one run (the same
machinery as the fan-out's, bench.proxies): direct (the service), varnish
or nginx (the shipped deploy/ configurations in front of the service, run
with --shared-cache-seconds 1; the writer posts to the service), nchan and
nchan-multipart (Nchan's long-poll subscribers, a channel per content, the
bench publishing to it: no service at all; multipart answers carry every
message since the cursor). --busy-pace-ms runs the service's rows once per
value (LIVECOMMENTS_BUSY_PACE_MS; "default" is the service's own).

Checked: every viewer got every comment of its content exactly once (a
comment seen twice is a duplicate; one never seen is missing).

Columns
  deliv/exp       (viewer, comment) deliveries / expected
  p50/p99/max     ms from just before each POST (publish) to the viewer's answer
  front req/s     answers the viewers got, per second of the window
  svc req/s       feed answers the service gave (its /metrics), per second;
                  behind a cache, what reached the service
  per answer      deliveries per viewer answer (comments per answer)
  CPU ms/1k       server-side CPU (service + cache process, or Nchan's nginx)
                  per 1,000 deliveries: what a client-bound run cannot distort
  RSS MB          peak resident memory of the same processes
  client          the bench's own CPU share of one core in the window; a
                  row above 75 % is client-bound (its latencies are the
                  client's queue, not the server's)
  other           CPU-seconds used meanwhile by everything else on the machine
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import gzip
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import proxies, server, table
from .common import BenchRun, counts, mint_token, progress, raise_open_files, run_async
from .database import fresh_database
from .eventsides import NchanSide, ServiceSide
from .nchan import messages
from .table import percentile
from .trial import busy_seconds

#: Pages (raw bytes) parsed once and remembered: many viewers get the same.
PAGE_CACHE = 20_000


def add_arguments(parser):
    parser.add_argument("--viewers", default="2000", type=counts,
                        help="comma-separated V values, a run each (default %(default)s)")
    parser.add_argument("--contents", type=counts, default=[4],
                        help="contents C, or a list (1,4) run in turn (default 4)")
    parser.add_argument("--via", default="direct", type=proxies.vias,
                        help=f"comma-separated, of {', '.join(proxies.VIAS)} (default %(default)s)")
    parser.add_argument("--busy-pace-ms", default=[None], type=paces, metavar="MS",
                        help="LIVECOMMENTS_BUSY_PACE_MS for the service's rows, or a list "
                        "(default,0) run in turn (default: the service's own)")
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
    parser.add_argument("--connect-batch", type=int, default=200,
                        help="viewers connecting per 0.1 s (default 200)")


def paces(text):
    """``default,0`` → [None, 0] (an argparse type)."""
    values = [None if v.strip() == "default" else int(v) for v in text.split(",") if v.strip()]
    if not values or any(v is not None and v < 0 for v in values):
        raise ValueError(text)
    return values


def run(args):
    raise_open_files(2 * max(args.viewers) + 512)
    return run_async(lambda loop: Event(args, loop).run())


@dataclass(frozen=True)
class Plan:
    """One row: V viewers over C contents through ``via``; ``pace`` for the service."""

    v: int
    contents: int
    via: str
    pace: int | None

    @property
    def name(self):
        pace = "" if self.pace is None else f"-pace{self.pace}"
        return f"{self.via}-V{self.v}-C{self.contents}{pace}"


class Event(BenchRun):
    command = "event"

    async def run(self):
        args = self.args
        progress(f"event: V={','.join(map(str, args.viewers))} over "
                 f"{','.join(map(str, args.contents))} contents via {','.join(args.via)}, "
                 f"{args.rate:g} comments/s for {args.duration:g} s; client loop "
                 f"{self.loop_name}")
        progress(table.text_row({}, COLUMNS, header=True))
        for v in args.viewers:
            for contents in args.contents:
                for via in args.via:
                    for pace in ([None] if via in proxies.NCHANS else args.busy_pace_ms):
                        row = await self.one(Plan(v, contents, via, pace))
                        self.rows.append(row)
                        progress(table.text_row(row, COLUMNS))
        print(table.text_table(self.rows, COLUMNS))
        document = {**table.run_info("event", args.argv, args.label),
                    "client_loop": self.loop_name,
                    "database": "postgresql" if args.database_url else "sqlite",
                    "workers": args.workers, "via": args.via,
                    "settings": {k: v for k, v in vars(self.settings).items() if k != "secret"},
                    "rows": self.rows}
        path = args.json or args.results_dir / f"event-{self.stamp}.json"
        progress(f"written: {table.write_json(path, document)}")
        return 0 if all(r["missing"] == 0 and r["duplicates"] == 0 for r in self.rows) else 1

    async def one(self, plan):
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            if plan.via in proxies.NCHANS:
                with proxies.nchan(Path(tmp) / plan.name, log_path=self.log_path(plan.name),
                                   multipart=plan.via == "nchan-multipart") as nchan:
                    side = NchanSide(nchan.url, uuid.uuid4().hex[:8])
                    try:
                        return await self.measure(plan, side, [nchan])
                    finally:
                        await side.close()
            return await self.one_service(plan, Path(tmp))

    async def one_service(self, plan, tmp):
        env = dict(self.env)
        if plan.pace is not None:
            env["LIVECOMMENTS_BUSY_PACE_MS"] = str(plan.pace)
        flags = list(self.flags) + proxies.service_flags(plan.via)
        if self.args.workers > 1:
            flags += ["--workers", str(self.args.workers)]
        database = fresh_database(self.args.database_url, tmp)
        try:
            database.create(env)
            with contextlib.ExitStack() as stack:
                service = stack.enter_context(server.service(
                    database.url, flags, env=env, log_path=self.log_path(plan.name)))
                servers, url = [service], service.url
                if plan.via in proxies.CACHES:
                    front = stack.enter_context(proxies.front(
                        plan.via, tmp / plan.name, service.port,
                        log_path=self.log_path(f"{plan.name}-proxy")))
                    servers, url = [service, front], front.url
                side = ServiceSide(url, service.url, mint_token(env))
                try:
                    row = await self.measure(plan, side, servers)
                finally:
                    await side.close()
                row["service_cpu_s"] = row["_cpu"][0]
                row["proxy_cpu_s"] = row["_cpu"][1] if len(servers) > 1 else None
                return row
        finally:
            database.drop()

    async def measure(self, plan, side, servers):
        args = self.args
        total = int(args.rate * args.duration)
        crowd = Crowd(plan, total)
        peak_rss = [0.0]
        tasks = [asyncio.create_task(side.follow(crowd, viewer, i // args.connect_batch * 0.1))
                 for i, viewer in enumerate(crowd.viewers)]
        sampler = asyncio.create_task(sample_rss(servers, peak_rss))
        try:
            deadline = time.perf_counter() + 60 + plan.v / 100
            while not await side.ready(crowd) and time.perf_counter() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(args.settle)
            before = [s.usage().cpu_s for s in servers]
            upstream_before = await side.upstream()
            client_before, machine_before = psutil.Process().cpu_times(), psutil.cpu_times()
            answers_before, errors_before = crowd.answers, crowd.error_count
            gc.disable()  # no collection pauses while arrivals are timed
            started = time.perf_counter()
            post_ms = await post_all(side, crowd, args)
            await asyncio.sleep(args.tail)
            seconds = time.perf_counter() - started
            gc.enable()
            after = [s.usage().cpu_s for s in servers]
            client_after, machine_after = psutil.Process().cpu_times(), psutil.cpu_times()
            answers = crowd.answers - answers_before
            errors = crowd.error_count - errors_before
            upstream_after = await side.upstream()
        finally:
            gc.enable()
            for task in [*tasks, sampler]:
                task.cancel()
            await asyncio.gather(*tasks, sampler, return_exceptions=True)
        cpu = [a - b for a, b in zip(after, before, strict=True)]
        client_s = (client_after.user + client_after.system
                    - client_before.user - client_before.system)
        busy_s = busy_seconds(machine_after) - busy_seconds(machine_before)
        latencies, missing, expected = crowd.latencies()
        delivered = len(latencies)
        server_s = sum(cpu)
        return {
            "via": plan.via, "V": plan.v, "contents": plan.contents,
            "busy_pace_ms": (None if plan.via in proxies.NCHANS else
                             self.settings.busy_pace_ms if plan.pace is None else plan.pace),
            "rate": args.rate, "duration_s": args.duration, "window_s": seconds,
            "workers": args.workers if plan.via not in proxies.NCHANS else None,
            "posts": crowd.posted(), "expected": expected, "delivered": delivered,
            "missing": missing, "duplicates": crowd.duplicates,
            "viewer_errors": errors, "error_kinds": dict(crowd.error_kinds),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies, default=None),
            "cdf_ms": [percentile(latencies, p) for p in range(1, 101)],
            "front_rps": answers / seconds,
            "service_rps": (None if upstream_before is None or upstream_after is None
                            else (upstream_after - upstream_before) / seconds),
            "comments_per_answer": delivered / answers if answers else None,
            "post_p99_ms": percentile(post_ms, 99),
            "server_cpu_s": server_s, "_cpu": cpu,
            "cpu_ms_per_1k": server_s * 1e6 / delivered if delivered else None,
            "peak_rss_mb": peak_rss[0],
            "client_cpu_s": client_s, "client_share": client_s / seconds,
            "client_bound": client_s / seconds > table.CLIENT_BOUND,
            "other_cpu_s": max(0.0, busy_s - server_s - client_s),
            "load_avg": os.getloadavg()[0],
        }


class Viewer:
    __slots__ = ("content", "cursor", "arrivals")

    def __init__(self, content, slots):
        self.content = content
        self.cursor = None  # set once it follows: its first page (or Nchan request) is out
        self.arrivals = array.array("d", [math.nan]) * slots  # by the content's post number


class Crowd:
    """The viewers, what was posted to whom and when, and what each got."""

    def __init__(self, plan, total):
        self.contents = plan.contents
        slots = -(-total // plan.contents)
        self.viewers = [Viewer(1 + i % plan.contents, slots) for i in range(plan.v)]
        self.tag = uuid.uuid4().hex[:8]
        self.index = {}  # comment body (bytes) -> post number k
        self.sent = [None] * total  # k -> perf_counter() just before its POST; None: failed
        self.answers = 0
        self.duplicates = 0
        self.error_count = 0
        self.error_kinds = {}
        self._pages = {}

    def body(self, k):
        body = f"event {self.tag} comment {k}"
        self.index[body.encode()] = k
        return body

    def content_of(self, k):
        return 1 + k % self.contents

    def error(self, kind):
        self.error_count += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def page(self, resp):
        """(post numbers, cursor, poll_after_ms) of a service page; ValueError if none."""
        raw = resp.body
        got = self._pages.get(raw)
        if got is None:
            data = gzip.decompress(raw) if resp.headers.get("content-encoding") == "gzip" else raw
            page = json.loads(data)
            if "cursor" not in page:
                raise ValueError("no cursor")  # an error document: 503 while draining, say
            index = self.index
            ks = tuple(k for c in page["comments"]
                       if (k := index.get(str(c.get("body")).encode())) is not None)
            got = (ks, page["cursor"], page.get("poll_after_ms") or 0)
            if len(self._pages) >= PAGE_CACHE:
                self._pages.clear()
            self._pages[raw] = got
        return got

    def messages(self, resp):
        """Post numbers of an Nchan answer."""
        index = self.index
        return [k for m in messages(resp) if (k := index.get(m)) is not None]

    def deliver(self, viewer, ks, arrived):
        self.answers += 1
        arrivals, contents = viewer.arrivals, self.contents
        for k in ks:
            slot = k // contents
            if arrivals[slot] == arrivals[slot]:  # not NaN: seen before
                self.duplicates += 1
            else:
                arrivals[slot] = arrived

    def posted(self):
        return sum(sent is not None for sent in self.sent)

    def latencies(self):
        """(ms of every delivery, missing, expected)."""
        by_content = {}
        for k, sent in enumerate(self.sent):
            if sent is not None:
                by_content.setdefault(self.content_of(k), []).append((k // self.contents, sent))
        latencies, missing = [], 0
        for viewer in self.viewers:
            arrivals = viewer.arrivals
            for slot, sent in by_content.get(viewer.content, ()):
                arrived = arrivals[slot]
                if arrived == arrived:
                    latencies.append((arrived - sent) * 1e3)
                else:
                    missing += 1
        return latencies, missing, len(latencies) + missing


async def post_all(side, crowd, args):
    """R posts a second for D seconds, each on its own schedule (a slow one
    does not hold back the next); the round trips in ms."""
    total = len(crowd.sent)
    first = time.perf_counter()
    post_ms = []

    async def one(k):
        await asyncio.sleep(max(0.0, first + k / args.rate - time.perf_counter()))
        ok, ms = await side.publish(crowd, k)
        if ok:
            post_ms.append(ms)
        else:
            crowd.sent[k] = None  # not stored: nobody should get it

    await asyncio.gather(*(one(k) for k in range(total)))
    return post_ms


async def sample_rss(servers, peak):
    while True:
        peak[0] = max(peak[0], sum(s.usage().rss_mb for s in servers))
        await asyncio.sleep(1.0)


def _cpu_ms(row):
    value = row.get("cpu_ms_per_1k")
    return "-" if value is None else f"{value:.0f}"


Column = table.Column
COLUMNS = [
    Column("via", "via", width=15), Column("V", "V", width=5), Column("C", "contents", width=2),
    Column("pace", "busy_pace_ms", width=4),
    Column("deliv/exp", lambda r: f"{r.get('delivered', '')}/{r.get('expected', '')}",
           width=15),
    Column("dupes", "duplicates"), Column("errors", "viewer_errors"),
    Column("p50 ms", "p50_ms"), Column("p99 ms", "p99_ms"), Column("max ms", "max_ms"),
    Column("front req/s", "front_rps"), Column("svc req/s", "service_rps"),
    Column("per answer", "comments_per_answer", 1),
    Column("CPU ms/1k", _cpu_ms, width=9), Column("server CPU s", "server_cpu_s", 1),
    Column("RSS MB", "peak_rss_mb"), Column("client", "client_share", 2),
    Column("other", "other_cpu_s", 1),
]
