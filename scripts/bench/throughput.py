"""Throughput: catch-up GETs and POSTs per second next to the bare stack's ceiling.

Closed loops from this process (aiohttp, keep-alive), each for --seconds
after a short warm-up, in one run:

  ceiling    GET / of the hello-world app (bench.hello) on the service's
             waitress with the same flags: what waitress and Falcon alone answer
  catch-up   GET /contents/1/comments?since=N-B&wait=0 on the service: the
             last B changes, from the feed's memory (B = --catch-up-behind)
  POST       --writers W clients, each posting to a content of its own as an
             author of its own (the posting limit on, at --post-rate); each
             content watched by --watchers held viewers, so every POST also
             waits for its process's feed to have it (read-your-writes)
  POST @REV  the same against the service as it was at git revision REV
             (--baseline-rev, repeatable): before/after in the same run

Columns: requests/s answered as expected (200, or 201), its share of the
ceiling, latency p50/p99/max, the statuses seen, the server's CPU ms per
answered request.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from . import load, server, table
from .common import BenchRun, mint_token, progress, raise_open_files, run_async
from .database import fresh_database


def add_arguments(parser):
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="seconds of load per row (default 5)")
    parser.add_argument("--connections", type=int, default=50,
                        help="clients of the ceiling and catch-up rows (default 50)")
    parser.add_argument("--writers", type=int, default=20, help="POST clients (default 20)")
    parser.add_argument("--watchers", type=int, default=1,
                        help="held viewers per written content, 0 for none (default 1)")
    parser.add_argument("--catch-up-behind", type=int, default=1,
                        help="changes in a catch-up page (default 1)")
    parser.add_argument("--post-rate", default="1000000/1",
                        help="serve --post-rate: on, so its check is paid (default %(default)s)")
    parser.add_argument("--baseline-rev", action="append", default=[], metavar="REV",
                        help="also measure POSTs on the service at this git revision")
    parser.add_argument("--rounds", type=int, default=1,
                        help="POST rows per service, alternating services (default 1)")


def run(args):
    raise_open_files(args.connections + args.writers * (args.watchers + 1) + 256)
    return run_async(lambda loop: Throughput(args, loop).run())


class Throughput(BenchRun):
    command = "throughput"

    async def run(self):
        args = self.args
        progress(f"throughput: {args.seconds:g} s per row; {args.writers} writers, "
                 f"{args.watchers} watcher(s) each; client loop {self.loop_name}")
        with server.hello(self.flags, env=self.env, log_path=self.log_path("hello")) as app:
            async with load.session() as http:
                result = await load.closed_loop(
                    [load.get(http, app.url + "/")] * args.connections, args.seconds)
            self.add("ceiling", result, app)
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            services = [("current", None)] + [(f"@{rev}", rev) for rev in args.baseline_rev]
            for round_ in range(args.rounds):
                for name, rev in services:
                    await self.service_rows(name, rev, Path(tmp), catch_up=round_ == 0)
        self.report()
        return 0

    def add(self, what, result, process, before=None, ok=(200,)):
        row = {"what": what, **result.figures(ok)}
        if before is not None:
            cpu = process.usage().cpu_s - before.cpu_s
            row["cpu_ms_per_req"] = cpu * 1000 / row["ok"] if row["ok"] else None
        ceiling = self.rows[0]["rps"] if self.rows else row["rps"]
        row["of_ceiling"] = row["rps"] / ceiling if ceiling else None
        self.rows.append(row)
        progress(table.text_row(row, COLUMNS))

    async def service_rows(self, name, rev, tmp, *, catch_up):
        database = fresh_database(self.args.database_url, tmp)
        try:
            flags = [*self.flags, "--post-rate", self.args.post_rate]
            if rev is None:
                database.create(self.env)
                process = server.service(database.url, flags, env=self.env,
                                         log_path=self.log_path(name))
            else:
                # The revision's own init-db: its schema version may differ.
                directory = extract_revision(rev, tmp / rev)
                database.create({**self.env, "PYTHONPATH": str(directory)},
                                command=[sys.executable, "-m", "service"], cwd=directory)
                process = revision_service(rev, directory, database.url, flags, env=self.env,
                                           log_path=self.log_path(name))
            with process:
                async with load.session() as http:
                    if catch_up:
                        await self.catch_up(http, process, name)
                    await self.posts(http, process, name)
        finally:
            database.drop()

    async def catch_up(self, http, process, name):
        args = self.args
        token = mint_token(self.env)
        url = f"{process.url}/contents/1/comments"
        for k in range(args.catch_up_behind + 5):
            await (load.post(http, url, token, lambda n, k=k: body(k)))()
        # The session leaves bodies as sent (no decompression): ask for it plain.
        async with http.get(url + "?wait=0", headers={"Accept-Encoding": "identity"}) as resp:
            cursor = json.loads(await resp.read())["cursor"]
        page = f"{url}?since={cursor - args.catch_up_behind}&wait=0"
        before = process.usage()
        result = await load.closed_loop([load.get(http, page)] * args.connections, args.seconds)
        self.add(f"catch-up {name}", result, process, before)

    async def posts(self, http, process, name):
        args = self.args
        watchers = []
        requests = []
        for w in range(args.writers):
            content = 1000 + w
            url = f"{process.url}/contents/{content}/comments"
            token = mint_token(self.env, author_id=1000 + w)
            requests.append(load.post(http, url, token, body))
            watchers += [asyncio.create_task(watch(http, url)) for _ in range(args.watchers)]
        try:
            await asyncio.sleep(0.5 if watchers else 0)  # the feeds load, the viewers are held
            before = process.usage()
            result = await load.closed_loop(requests, args.seconds)
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        self.add(f"POST {name}", result, process, before, ok=(201,))

    def report(self):
        print(table.text_table(self.rows, COLUMNS))
        document = {
            **table.run_info("throughput", self.args.argv, self.args.label),
            "client_loop": self.loop_name,
            "database": "postgresql" if self.args.database_url else "sqlite",
            "settings": {k: v for k, v in vars(self.settings).items() if k != "secret"},
            "waitress": server.waitress_settings(self.settings),
            "rows": self.rows,
        }
        path = self.args.json or self.args.results_dir / f"throughput-{self.stamp}.json"
        progress(f"written: {table.write_json(path, document)}")


def body(number):
    return json.dumps({"body": f"throughput comment {number}"})


async def watch(http, url):
    """A viewer held on ``url`` for as long as the task runs."""
    async with http.get(url + "?wait=0") as resp:
        cursor = json.loads(await resp.read())["cursor"]
    while True:
        async with http.get(f"{url}?since={cursor}&wait=30") as resp:
            page = json.loads(await resp.read())
        cursor = page["cursor"]


def extract_revision(rev, directory):
    """The service as it was at git revision ``rev``, in ``directory`` (made once)."""
    if not directory.exists():
        directory.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", rev, "service", "schema.sql", "docs/openapi.yaml"],
            cwd=server.ROOT, capture_output=True, check=True, timeout=60).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(directory, filter="data")
    return directory


def revision_service(rev, directory, database_url, flags, *, env, log_path):
    """``python -m service serve`` of the service at git revision ``rev``,
    extracted in ``directory`` (:func:`extract_revision`)."""
    port = server.free_port()
    command = [sys.executable, "-m", "service", "serve", "--port", port,
               "--database-url", database_url, *flags]
    # Its own directory first on the path: its service package, not this checkout's.
    return server.ServerProcess(command, port, env={**env, "PYTHONPATH": str(directory)},
                                log_path=log_path, cwd=directory)


Column = table.Column
COLUMNS = [
    Column("what", "what", width=22),
    Column("clients", "clients", width=7),
    Column("req/s", "rps", width=6),
    Column("of ceiling", lambda r: table.fmt(r.get("of_ceiling") and 100 * r["of_ceiling"]) + " %",
           width=10),
    Column("p50 ms", "p50_ms", 1, width=6),
    Column("p99 ms", "p99_ms", 1, width=6),
    Column("max ms", "max_ms", width=6),
    Column("CPU ms/req", "cpu_ms_per_req", 2, width=10),
    Column("statuses", lambda r: " ".join(f"{k}:{v}" for k, v in r["statuses"].items()),
           width=12),
]
