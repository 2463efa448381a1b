"""Database load: queries per second against viewers, the service and the seed's design.

For each V, on a PostgreSQL database of its own (so pg_stat_database
counts this run alone), V viewers follow one content while a writer posts
a comment every --post-every seconds; after --settle seconds the window
of --window seconds is measured:

  service   `livecomments serve`: viewers long-poll (wait=30), honouring
            poll_after_ms; its pollers query the database, its viewers never
  seed      the seed's design (bench.seed): every viewer polls once every
            --seed-interval seconds, and every poll is a query

Columns
  DB tx/s        pg_stat_database commits+rollbacks per second in the window
                 (every statement in autocommit is one; the writer's posts count)
  feed q/s       the service's own count of its feed queries (/metrics:
                 livecomments_feed_query_seconds_count), per second
  answers/s      answers the viewers got, per second
  wanted q/s     the seed's viewers' polls per second if the server kept up
  CPU s          the server's CPU seconds in the window

PostgreSQL flushes a backend's counts about once a second while it works,
and ten seconds after it idles: keep the window at 20 s or more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp

from . import server, table
from .common import BenchRun, counts, mint_token, progress, raise_open_files, run_async
from .database import PrivateDatabase
from .dbstats import TransactionCounter
from .load import session


def add_arguments(parser):
    parser.add_argument("--viewers", default="1,10,100,1000,2000", type=counts,
                        help="comma-separated V values (default %(default)s)")
    parser.add_argument("--window", type=float, default=20.0,
                        help="seconds measured per row (default 20)")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds after the viewers are in, before the window (default 3)")
    parser.add_argument("--post-every", type=float, default=1.0,
                        help="seconds between the writer's posts (default 1)")
    parser.add_argument("--seed-interval", type=float, default=1.0,
                        help="seconds between a seed viewer's polls (default 1)")
    parser.add_argument("--seed", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the seed's design too (default: yes)")


def run(args):
    if not args.database_url:
        raise SystemExit("bench dbload: needs --database-url (PostgreSQL)")
    raise_open_files(max(args.viewers) + 256)
    return run_async(lambda loop: DbLoad(args, loop).run())


class DbLoad(BenchRun):
    command = "dbload"

    async def run(self):
        args = self.args
        progress(f"dbload: V={','.join(map(str, args.viewers))}, window {args.window:g} s, "
                 f"a post every {args.post_every:g} s; client loop {self.loop_name}")
        progress(table.text_row({}, COLUMNS, header=True))
        for v in args.viewers:
            for design in ("service", "seed") if args.seed else ("service",):
                row = await self.measure(design, v)
                self.rows.append(row)
                progress(table.text_row(row, COLUMNS))
        self.report()
        return 0

    def process(self, design, database):
        if design == "service":
            return server.service(database.url, self.flags, env=self.env,
                                  log_path=self.log_path(f"service-V{len(self.rows)}"))
        port = server.free_port()
        command = [sys.executable, "-m", "bench.seed", *self.flags, "--port", port,
                   "--database-url", database.url]
        env = {**self.env, "PYTHONPATH": str(server.ROOT / "scripts")}
        return server.ServerProcess(command, port, env=env,
                                    log_path=self.log_path(f"seed-V{len(self.rows)}"))

    async def measure(self, design, v):
        args = self.args
        database = PrivateDatabase(args.database_url)
        try:
            database.create(self.env)
            counter = TransactionCounter(database.url)
            try:
                with self.process(design, database) as process:
                    return await self.window(design, v, process, counter)
            finally:
                counter.close()
        finally:
            database.drop()

    async def window(self, design, v, process, counter):
        args = self.args
        url = f"{process.url}/contents/1/comments"
        answers = [0]
        async with session(timeout=60) as http:
            follow = follow_service if design == "service" else follow_seed
            viewers = [asyncio.create_task(follow(http, url, answers, args.seed_interval, i))
                       for i in range(v)]
            writer = asyncio.create_task(write(http, url, mint_token(self.env), args.post_every))
            try:
                await asyncio.sleep(args.settle + v / 1000)
                start_answers, db_start = answers[0], counter.read()
                feed_start = await feed_queries(http, process.url) if design == "service" else 0
                usage = process.usage()
                started = time.perf_counter()
                await asyncio.sleep(args.window)
                seconds = time.perf_counter() - started
                db_end, cpu = counter.read(), process.usage().cpu_s - usage.cpu_s
                feed_end = await feed_queries(http, process.url) if design == "service" else 0
                done = answers[0] - start_answers
            finally:
                for task in [*viewers, writer]:
                    task.cancel()
                await asyncio.gather(*viewers, writer, return_exceptions=True)
        return {"design": design, "V": v, "window_s": seconds,
                "db_tps": counter.rate(db_start, db_end),
                "feed_qps": (feed_end - feed_start) / seconds if design == "service" else None,
                "answers_per_s": done / seconds,
                "wanted_qps": v / args.seed_interval if design == "seed" else None,
                "cpu_s": cpu, "rss_mb": usage.rss_mb}

    def report(self):
        print(table.text_table(self.rows, COLUMNS))
        document = {**table.run_info("dbload", self.args.argv, self.args.label),
                    "client_loop": self.loop_name, "database": "postgresql",
                    "settings": {k: v for k, v in vars(self.settings).items() if k != "secret"},
                    "rows": self.rows}
        path = self.args.json or self.args.results_dir / f"dbload-{self.stamp}.json"
        progress(f"written: {table.write_json(path, document)}")


async def follow_service(http, url, answers, _interval, index):
    await asyncio.sleep(index // 200 * 0.1)  # connect in batches
    cursor = None
    while True:
        target = f"{url}?wait=0" if cursor is None else f"{url}?since={cursor}&wait=30"
        try:
            async with http.get(target) as resp:
                page = json.loads(await resp.read())
        except (TimeoutError, aiohttp.ClientError, ValueError):
            await asyncio.sleep(1.0)
            continue
        answers[0] += 1
        cursor = page.get("cursor", cursor)
        if page.get("poll_after_ms"):
            await asyncio.sleep(page["poll_after_ms"] / 1000)


async def follow_seed(http, url, answers, interval, index):
    await asyncio.sleep(index % 100 * interval / 100)  # polls spread over the second
    cursor = 0
    while True:
        try:
            async with http.get(f"{url}?since={cursor}") as resp:
                cursor = json.loads(await resp.read())["cursor"]
            answers[0] += 1
        except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
            pass
        await asyncio.sleep(interval)


async def write(http, url, token, every):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    k = 0
    while True:
        k += 1
        try:
            async with http.post(url, data=json.dumps({"body": f"dbload {k}"}),
                                 headers=headers) as resp:
                await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(every)


async def feed_queries(http, base_url):
    async with http.get(f"{base_url}/metrics") as resp:
        text = (await resp.read()).decode()
    for line in text.splitlines():
        if line.startswith("livecomments_feed_query_seconds_count "):
            return float(line.split()[1])
    return 0.0


Column = table.Column
COLUMNS = [
    Column("design", "design", width=7), Column("V", "V", width=5),
    Column("DB tx/s", "db_tps", 1, width=7), Column("feed q/s", "feed_qps", 2, width=8),
    Column("answers/s", "answers_per_s", 1, width=9),
    Column("wanted q/s", "wanted_qps", 0, width=10), Column("CPU s", "cpu_s", 2, width=5),
]
