"""Several feeds over one connection: V viewers each following 10 of 20 contents.

Each viewer follows its own subset of --follow contents out of --contents
(drawn with a seed of the viewer's number: deterministic, and different
from viewer to viewer), in two modes, one after the other in one run, each
on a fresh database and service:

  one   one keep-alive connection per viewer: ``/comments?feeds=3,8,…`` for
        the latest pages, then ``/comments?feeds=3:17,8:5,…`` from the
        answer's cursors (issue 16)
  each  one connection per content followed (10 per viewer): the single
        read ``/contents/{id}/comments?since=N`` on each, as today

Once every connection has its cursors and --settle seconds have passed, a
writer posts --rate comments a second, round robin over the contents, for
--duration seconds; the window ends --tail seconds after the last post.
The service runs with its hold budget as configured (default 1,000 per
process): 10 connections per viewer past it are shed and come back after
``poll_after_ms``, which is part of what is compared; the connection limit
is raised to fit every connection.

Checked: every viewer got every comment of its contents exactly once
(a comment seen twice is a duplicate, one never seen is missing).

Columns
  conns          viewer connections open
  held           long-polls the service held just before the first post (/metrics:
                 every worker's)
  deliv/exp      (viewer, comment) deliveries / expected; dupes, missing
  req/s          the viewers' requests per second over the window
  answers        the service's feed answers in the window, by kind (/metrics)
  p50/p99/max    latency from just before the POST to the viewer's answer, ms
  CPU s          service utime+stime over the window (psutil, all its processes)
  CPU µs/deliv   service CPU per delivered comment
  client CPU s   the bench's processes (the viewers' and the writer's) over the window
  other CPU s    the machine's busy CPU meanwhile, less the service's and the client's
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import tempfile
import time
import uuid

import aiohttp
import psutil

from . import server, table
from .common import BenchRun, counts, mint_token, progress, raise_open_files, run_async
from .database import fresh_database
from .event import sample_rss
from .feedclients import CONNECT_BATCH, CONNECT_PAUSE, Clients
from .load import session
from .table import percentile

MODES = ("one", "each")


async def post_all(http, base_url, token, args, sent, post_ms):
    """R posts a second for D seconds, round robin over the contents, each
    on its own schedule (a slow one does not hold back the next); ``sent``
    maps each body to (content, time sent), ``post_ms`` gets round trips."""
    tag = uuid.uuid4().hex[:8]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    total = int(args.rate * args.duration)
    first = time.perf_counter()

    async def one(k):
        await asyncio.sleep(max(0.0, first + k / args.rate - time.perf_counter()))
        content = 1 + k % args.contents
        body = f"feeds {tag} comment {k}"
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


def add_arguments(parser):
    parser.add_argument("--viewers", default="500,2000", type=counts,
                        help="comma-separated V values, both modes each (default %(default)s)")
    parser.add_argument("--contents", type=int, default=20, help="contents (default 20)")
    parser.add_argument("--follow", type=int, default=10,
                        help="contents each viewer follows (default 10)")
    parser.add_argument("--modes", default="one,each", type=modes,
                        help="one (a connection per viewer), each (a connection per "
                        "content followed), in this order (default %(default)s)")
    parser.add_argument("--rate", type=float, default=2.0,
                        help="comments per second, over all contents (default 2)")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of posting (default 20)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds after every connection has its cursor (default 2)")
    parser.add_argument("--tail", type=float, default=5.0,
                        help="seconds kept after the last post (default 5)")
    parser.add_argument("--workers", type=int, default=1,
                        help="serve --workers K (PostgreSQL; default 1)")


def modes(text):
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    if not chosen or set(chosen) - set(MODES):
        raise ValueError(text)
    return chosen


def subset(index, contents, follow):
    """Viewer ``index``'s contents: ``follow`` of 1..``contents``, ascending."""
    return sorted(random.Random(index).sample(range(1, contents + 1), follow))


def run(args):
    if args.follow > args.contents:
        raise SystemExit("feeds: --follow must not exceed --contents")
    raise_open_files(max(args.viewers) * args.follow + 4096)  # the service's, inherited
    return run_async(lambda loop: Feeds(args, loop).run())


class Feeds(BenchRun):
    command = "feeds"

    async def run(self):
        args = self.args
        progress(f"feeds: V={','.join(map(str, args.viewers))}, each following {args.follow} of "
                 f"{args.contents} contents, modes {','.join(args.modes)}; {args.rate:g} "
                 f"comments/s for {args.duration:g} s; workers {args.workers}; hold budget "
                 f"{self.settings.hold_budget}; client loop {self.loop_name}")
        progress(table.text_row({}, COLUMNS, header=True))
        for v in args.viewers:
            for mode in args.modes:
                row = await self.one(v, mode)
                self.rows.append(row)
                progress(table.text_row(row, COLUMNS))
        print(table.text_table(self.rows, COLUMNS))
        ratios = compare(self.rows)
        if ratios:
            print(table.text_table(ratios, RATIO_COLUMNS))
        document = {**table.run_info("feeds", args.argv, args.label),
                    "client_loop": self.loop_name,
                    "database": "postgresql" if args.database_url else "sqlite",
                    "workers": args.workers, "cpus": psutil.cpu_count(),
                    "settings": {k: v for k, v in vars(self.settings).items() if k != "secret"},
                    "rows": self.rows, "ratios": ratios}
        path = args.json or args.results_dir / f"feeds-{self.stamp}.json"
        progress(f"written: {table.write_json(path, document)}")
        return 0 if all(r["missing"] == 0 and r["duplicates"] == 0 for r in self.rows) else 1

    async def one(self, v, mode):
        flags = list(self.flags)
        if self.args.workers > 1:
            flags += ["--workers", str(self.args.workers)]
        if not any(flag.startswith("--connection-limit") for flag in flags):
            connections = v * (1 if mode == "one" else self.args.follow)
            flags += ["--connection-limit", str(connections + 1000)]
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            database = fresh_database(self.args.database_url, tmp)
            try:
                database.create(self.env)
                with server.service(database.url, flags, env=self.env,
                                    log_path=self.log_path(f"{mode}-V{v}")) as service:
                    return await self.measure(v, mode, service)
            finally:
                database.drop()

    async def measure(self, v, mode, service):
        args = self.args
        contents = [subset(i, args.contents, args.follow) for i in range(v)]
        connections = v * (1 if mode == "one" else args.follow)
        sent = {}  # body -> (content, perf_counter before the POST)
        post_ms = []
        peak_rss = [0.0]
        clients = Clients(service.url, mode, contents, connections)
        async with session(timeout=60) as http:
            sampler = asyncio.create_task(sample_rss([service], peak_rss))
            try:
                deadline = time.perf_counter() + 60 + connections / CONNECT_BATCH * CONNECT_PAUSE
                ready = 0
                while ready < connections and time.perf_counter() < deadline:
                    await asyncio.sleep(0.5)
                    ready = await clients.ask("ready")
                await asyncio.sleep(args.settle)
                health = await asyncio.to_thread(metrics, service)
                before = (service.usage(), await clients.ask("mark"), busy_cpu(), own_cpu())
                started = time.perf_counter()
                await post_all(http, service.url, mint_token(self.env), args, sent, post_ms)
                await asyncio.sleep(args.tail)
                seconds = time.perf_counter() - started
                after = (service.usage(), await clients.ask("mark"), busy_cpu(), own_cpu())
                health_after = await asyncio.to_thread(metrics, service)
            finally:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
                viewers = await clients.stop()
        latencies, missing, expected = [], 0, 0
        for followed, (seen, _, _) in zip(contents, viewers, strict=True):
            followed = set(followed)
            for body, (content, when) in sent.items():
                if content not in followed:
                    continue
                expected += 1
                arrived = seen.get(body)
                if arrived is None:
                    missing += 1
                else:
                    latencies.append((arrived - when) * 1e3)
        cpu_s = after[0].cpu_s - before[0].cpu_s
        requests = after[1][0] - before[1][0]
        # The viewers' processes and this one (the writer).
        client_s = after[1][1] - before[1][1] + after[1][2] - before[1][2] + after[3] - before[3]
        delivered = len(latencies)
        answers = {}
        if health and health_after:
            answers = {kind: n - health["answers"].get(kind, 0)
                       for kind, n in health_after["answers"].items()
                       if n != health["answers"].get(kind, 0)}
        return {
            "V": v, "mode": mode, "connections": connections, "ready": ready,
            "client_processes": len(clients.pipes),
            "contents": args.contents, "follow": args.follow, "rate": args.rate,
            "duration_s": args.duration, "window_s": seconds, "workers": args.workers,
            "held": health.get("held") if health else None,
            "posts": len(sent), "expected": expected, "delivered": delivered,
            "missing": missing, "duplicates": sum(d for _, d, _ in viewers),
            "viewer_errors": sum(e for _, _, e in viewers),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies, default=None),
            "requests": requests, "requests_per_s": requests / seconds,
            "answers": answers, "post_p99_ms": percentile(post_ms, 99),
            "cpu_s": cpu_s, "cpu_us_per_delivery": cpu_s / delivered * 1e6 if delivered else None,
            "client_cpu_s": client_s,
            "other_cpu_s": max(0.0, after[2] - before[2] - cpu_s - client_s),
            "peak_rss_mb": peak_rss[0],
        }


def metrics(service):
    """{"held": hold slots in use, "answers": {kind: feed answers so far}},
    every worker's (the service's /metrics), or None."""
    conn = http.client.HTTPConnection(server.HOST, service.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        lines = resp.read().decode().splitlines()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    found = {"held": None, "answers": {}}
    for line in lines:
        if line.startswith("livecomments_held "):
            found["held"] = round(float(line.split()[1]))
        elif line.startswith("livecomments_feed_answers_total{"):
            labels, value = line.rsplit(" ", 1)
            kind = labels.split('kind="', 1)[1].split('"', 1)[0]
            found["answers"][kind] = found["answers"].get(kind, 0) + round(float(value))
    return found


def own_cpu():
    times = psutil.Process().cpu_times()
    return times.user + times.system


def busy_cpu():
    """CPU seconds the whole machine has spent busy (every core)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def compare(rows):
    """For each V with both modes: one ÷ each of the figures compared."""
    by = {(r["V"], r["mode"]): r for r in rows}
    ratios = []
    for v in sorted({r["V"] for r in rows}):
        one, each = by.get((v, "one")), by.get((v, "each"))
        if one is None or each is None:
            continue
        ratio = {"V": v}
        for key in ("connections", "requests_per_s", "cpu_us_per_delivery", "p50_ms", "p99_ms",
                    "client_cpu_s"):
            a, b = one.get(key), each.get(key)
            ratio[key] = a / b if a is not None and b else None
        ratios.append(ratio)
    return ratios


Column = table.Column
COLUMNS = [
    Column("V", "V", width=5), Column("mode", "mode", width=5),
    Column("conns", "connections", width=6), Column("held", "held", width=5),
    Column("posts", "posts"),
    Column("deliv/exp", lambda r: f"{r['delivered']}/{r['expected']}", width=13),
    Column("dupes", "duplicates"), Column("missing", "missing"),
    Column("errors", "viewer_errors"),
    Column("req/s", "requests_per_s"),
    Column("answers", lambda r: " ".join(f"{k}:{n}" for k, n in sorted(r["answers"].items())),
           width=30),
    Column("p50 ms", "p50_ms"), Column("p99 ms", "p99_ms"), Column("max ms", "max_ms"),
    Column("CPU s", "cpu_s", 1), Column("CPU µs/deliv", "cpu_us_per_delivery"),
    Column("client CPU s", "client_cpu_s", 1), Column("other CPU s", "other_cpu_s", 1),
    Column("peak RSS MB", "peak_rss_mb"),
]
RATIO_COLUMNS = [
    Column("V", "V", width=5), Column("conns one÷each", "connections", 2),
    Column("req/s one÷each", "requests_per_s", 2),
    Column("CPU/deliv one÷each", "cpu_us_per_delivery", 2),
    Column("p50 one÷each", "p50_ms", 2), Column("p99 one÷each", "p99_ms", 2),
    Column("client CPU one÷each", "client_cpu_s", 2),
]
