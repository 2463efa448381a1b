"""Fan-out: V held viewers on one content, W posts, delivery latency against the ceiling.

Starts the stack's ceiling app (bench.hello: the service's waitress, a
hello-world Falcon app) and measures its requests/s; then, for each V,
starts `livecomments serve` on a fresh database and runs the trials; then
measures the ceiling again. One trial: V viewers long-poll one content from
this process (aiohttp, one keep-alive connection each); once /healthz says
held == min(V, hold budget), and --settle seconds later, W comments are
posted and every viewer's answer is timed from just before the POST.

--via picks what the viewers talk to, several in one run (each V, each
via, next to one ceiling): direct (the service), varnish or nginx (the
shipped deploy/ configurations in front of the service, run with
--shared-cache-seconds 1; the service then holds one request per URL, so
"held" is 1), nchan (nginx's Nchan module, long-poll subscribers of one
channel, published to by the bench: the yardstick, not the service),
nchan-multipart (the same, an answer carrying every message since the
cursor). Each proxy's logs are kept beside the run's (see bench.proxies).
--workers K runs `serve --workers K` (PostgreSQL; "held" is every worker's,
from /metrics); a list (1,2) runs each, in one run next to one ceiling.

Columns
  held           long-polls the server held when posting (/healthz)
  deliv/exp      (viewer, post) deliveries received / V x W
  shed           (viewer, post) pairs whose viewer was not held for the post:
                 answered with poll_after_ms beyond the hold budget, it came back
                 after the pause; its latency is in "retry max ms", not the p's
  p50/p99/max    latency of the deliveries to held viewers, in ms
  V÷ceil ms      V ÷ ceiling requests/s: the time the bare stack needs to
                 answer V requests; p99/(V÷ceil) is how far fan-out is above it
  POST ms        slowest POST round trip
  CPU s          server utime+stime from the first post to the end of the window
                 (at least --db-window seconds); RSS MB while the viewers are held
  upstream/post  woken feed answers the service gave per comment (its /metrics):
                 V direct, 1 behind a cache that collapsed the viewers
  DB tx/s        PostgreSQL only: pg_stat_database commits+rollbacks / window
  other CPU s    CPU used meanwhile by everything but the server and the bench
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import uuid
from pathlib import Path

import aiohttp
import sqlalchemy as sa

from . import ceiling, proxies, server, table
from .common import BenchRun, counts, mint_token, progress, raise_open_files, run_async
from .database import fresh_database
from .nchan import run_nchan_trial
from .trial import TrialPlan, run_trial, summarise

VIAS = proxies.VIAS

#: A trial failing with one of these is recorded as an error row; the run goes on.
TRIAL_ERRORS = (OSError, RuntimeError, aiohttp.ClientError, sa.exc.SQLAlchemyError)


def add_arguments(parser):
    parser.add_argument("--viewers", default="100,500,1000,2000", type=counts,
                        help="comma-separated V values (default %(default)s)")
    parser.add_argument("--trials", type=int, default=3, help="trials per V (default 3)")
    parser.add_argument("--via", default="direct", type=proxies.vias,
                        help=f"comma-separated, of {', '.join(VIAS)} (default %(default)s)")
    parser.add_argument("--workers", type=counts, default=[1],
                        help="serve --workers K, or a list K1,K2 run in turn (default 1)")
    parser.add_argument("--posts", type=int, default=1, help="posts W per trial (default 1)")
    parser.add_argument("--post-gap", type=float, default=1.0,
                        help="seconds between posts when W > 1 (default 1.0)")
    parser.add_argument("--content-id", type=int, default=1)
    parser.add_argument("--wait", type=int, default=30, help="long-poll wait= (default 30)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds held idle after held is reached (default 1.0)")
    parser.add_argument("--tail", type=float, default=1.0,
                        help="seconds kept after the last delivery (default 1.0)")
    parser.add_argument("--db-window", type=float, default=5.0,
                        help="shortest CPU and DB measuring window, seconds (default 5)")
    parser.add_argument("--timeout", "--trial-timeout", type=float, default=60.0,
                        help="seconds a trial may take; setup may use half (default 60)")
    parser.add_argument("--connect-batch", type=int, default=200,
                        help="viewers connecting at once (default 200)")
    group = parser.add_argument_group("the stack's ceiling")
    group.add_argument("--ceiling-seconds", type=float, default=5.0,
                       help="seconds of load per measurement (default 5)")
    group.add_argument("--ceiling-connections", type=int, default=50,
                       help="concurrent keep-alive connections (default 50)")
    group.add_argument("--ceiling-tool", choices=("aiohttp", "wrk"), default="aiohttp",
                       help="load generator (default aiohttp; wrk if installed)")
    group.add_argument("--ceiling-after", action=argparse.BooleanOptionalAction, default=True,
                       help="measure it again after the trials (default: yes)")


def run(args):
    raise_open_files(max(args.viewers) + args.ceiling_connections + 256)
    return run_async(lambda loop: FanOut(args, loop).run())


class FanOut(BenchRun):
    """One bench run: the ceiling, then every V's trials, then the ceiling again."""

    command = "fanout"

    def __init__(self, args, loop_name):
        super().__init__(args, loop_name)
        self.plan = TrialPlan(
            content_id=args.content_id, posts=args.posts, post_gap=args.post_gap,
            wait=args.wait, settle=args.settle, tail=args.tail, db_window=args.db_window,
            timeout=args.timeout, connect_batch=args.connect_batch,
            hold_budget=self.settings.hold_budget, token=mint_token(self.env),
            tag=uuid.uuid4().hex[:8],
        )
        self.ceilings = {}

    async def run(self):
        args = self.args
        progress(f"fan-out: V={','.join(map(str, args.viewers))} via {','.join(args.via)}, "
                 f"{args.trials} trial(s), W={args.posts}; threads {self.settings.threads}, "
                 f"hold budget {self.settings.hold_budget}, workers {args.workers}; "
                 f"client loop {self.loop_name}")
        self.ceilings["before"] = await self.ceiling()
        progress(f"ceiling: {self.ceilings['before'].rps:.0f} requests/s")
        progress(table.text_row({}, COLUMNS, header=True))
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            for v in args.viewers:
                for via in args.via:
                    if via in proxies.NCHANS:
                        await self.run_nchan(v, Path(tmp), via)
                        continue
                    for workers in args.workers:
                        await self.run_viewers(v, Path(tmp), via, workers)
        if args.ceiling_after:
            self.ceilings["after"] = await self.ceiling()
            progress(f"ceiling after: {self.ceilings['after'].rps:.0f} requests/s")
        path = self.report()
        progress(f"written: {path}")
        return 0 if all(r["delivered"] == r["expected"] for r in self.rows) else 1

    async def ceiling(self):
        args = self.args
        with server.hello(self.flags, env=self.env, log_path=self.log_path("hello")) as app:
            return await ceiling.measure(app.url, connections=args.ceiling_connections,
                                         seconds=args.ceiling_seconds, tool=args.ceiling_tool)

    async def run_viewers(self, v, tmp, via, workers):
        """A fresh database and service for V (behind ``via``), shared by its trials."""
        database = fresh_database(self.args.database_url, tmp)
        flags = list(self.flags) + proxies.service_flags(via)
        if workers > 1:
            flags += ["--workers", str(workers)]
        try:
            database.create(self.env)
            counter = database.counter()
            try:
                with contextlib.ExitStack() as stack:
                    service = stack.enter_context(server.service(
                        database.url, flags, env=self.env, port=self.args.port,
                        log_path=self.log_path(f"{via}-V{v}-K{workers}")))
                    url, held = None, None
                    if via in proxies.CACHES:
                        proxy = stack.enter_context(proxies.front(
                            via, tmp / f"{via}-{v}-{workers}", service.port,
                            log_path=self.log_path(f"{via}-V{v}-K{workers}-proxy")))
                        url, held = proxy.url, 1  # one held request per URL upstream
                    for number in range(1, self.args.trials + 1):
                        if not service.alive:
                            progress(f"V={v}: the service died (exit {service.proc.returncode})"
                                     f"; see {service.log_path}")
                            break
                        await self.trial(via, v, number, run_trial(
                            self.plan, service, counter, v, number, url=url,
                            expected_held=held if held else min(
                                v, self.plan.hold_budget * workers)), workers)
            finally:
                if counter is not None:
                    counter.close()
        finally:
            database.drop()

    async def run_nchan(self, v, tmp, via):
        with proxies.nchan(tmp / f"{via}-{v}", log_path=self.log_path(f"{via}-V{v}"),
                           multipart=via == "nchan-multipart") as nchan:
            for number in range(1, self.args.trials + 1):
                await self.trial(via, v, number, run_nchan_trial(self.plan, nchan, v, number))

    async def trial(self, via, v, number, running, workers=1):
        try:
            row = await running
        except TRIAL_ERRORS as exc:
            row = {"V": v, "trial": number, "status": f"error: {exc!r}"[:80],
                   "delivered": 0, "expected": v * self.args.posts}
        row["via"], row["workers"] = via, workers
        self.rows.append(self.against_ceiling(row))
        progress(table.text_row(row, COLUMNS))

    def against_ceiling(self, row):
        """V / ceiling in ms, and p99 over it, from the ceiling measured first."""
        row["v_ceiling_ms"] = self.ceilings["before"].ms_for(row["V"])
        if row.get("p99_ms") is not None and row["v_ceiling_ms"]:
            row["p99_ratio"] = row["p99_ms"] / row["v_ceiling_ms"]
        return row

    def summaries(self):
        out = []
        for v in self.args.viewers:
            for via in self.args.via:
                for workers in ([1] if via in proxies.NCHANS else self.args.workers):
                    rows = [r for r in self.rows
                            if r["V"] == v and r["via"] == via and r["workers"] == workers]
                    if rows:
                        out.append(self.against_ceiling(
                            {**summarise(v, rows), "via": via, "workers": workers}))
        return out

    def report(self):
        """The tables on stdout; the JSON document to a file, whose path is returned."""
        summaries = self.summaries()
        ceilings = {when: c.as_dict() for when, c in self.ceilings.items()}
        print(f"ceiling (hello-world Falcon on the service's waitress, {self.settings.threads} "
              f"threads; {self.args.ceiling_tool}, {self.args.ceiling_connections} connections x "
              f"{self.args.ceiling_seconds:g} s): "
              + ", ".join(f"{c['rps']:.0f} req/s {when}" for when, c in ceilings.items()))
        print(table.text_table(self.rows, COLUMNS))
        print()
        print(table.text_table(summaries, SUMMARY_COLUMNS))
        document = {
            **table.run_info("fanout", self.args.argv, self.args.label),
            "client_loop": self.loop_name,
            "database": "postgresql" if self.args.database_url else "sqlite",
            "settings": {k: v for k, v in vars(self.settings).items() if k != "secret"},
            "waitress": server.waitress_settings(self.settings),
            "plan": {k: v for k, v in vars(self.plan).items() if k != "token"},
            "via": self.args.via, "workers": self.args.workers,
            "ceiling": ceilings, "trials": self.rows, "summary": summaries,
        }
        path = self.args.json or self.args.results_dir / f"fanout-{self.stamp}.json"
        return table.write_json(path, document)


Column = table.Column
_FIGURES = [
    Column("held", "held", width=5),
    Column("deliv/exp", lambda r: f"{r['delivered']}/{r['expected']}", width=11),
    Column("shed", "shed", width=5),
    Column("p50 ms", "p50_ms"),
    Column("p99 ms", "p99_ms"),
]
_MORE = [
    Column("max ms", "max_ms"),
    Column("retry max ms", "retry_max_ms"),
    Column("V÷ceil ms", "v_ceiling_ms"),
    Column("p99/(V÷ceil)", "p99_ratio", 1),
    Column("POST ms", "post_ms"),
    Column("CPU s", "cpu_s", 2),
    Column("RSS MB", "rss_mb"),
    Column("upstream/post", "upstream_woken_per_post", 1),
    Column("DB tx/s", "db_tps", 1),
    Column("other CPU s", "other_cpu_s", 2),
]
COLUMNS = [Column("via", "via", width=7), Column("K", "workers", width=2),
           Column("V", "V", width=5), Column("trial", "trial"),
           *_FIGURES, *_MORE, Column("status", "status", width=6)]
SUMMARY_COLUMNS = [Column("via", "via"), Column("K", "workers"), Column("V", "V"),
                   Column("trials", "trials"), *_FIGURES,
                   Column("p99 range", "p99_range"), *_MORE, Column("errors", "errors")]
