"""Timeouts on time: N holds of wait=W arriving over S seconds, answered how long after W.

Starts `livecomments serve` on a fresh database; N keep-alive connections
each take the content's cursor (GET ?wait=0), then each sends a long-poll
from that cursor with wait=W at its own moment, spread evenly over
--spread seconds. Nothing is posted, so every answer is a timeout.
Measured per hold: answer time − send time − W ("late", ms): p50/p99/max;
"early" counts answers before W (a bug), "not timeouts" answers that were
something else (shed beyond the hold budget, say). --rounds repeats on the
same service.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from . import server, table
from .common import BenchRun, mint_token, progress, raise_open_files, run_async
from .connection import ERRORS, Connection
from .database import fresh_database
from .table import percentile
from .viewers import Control


def add_arguments(parser):
    parser.add_argument("--holds", type=int, default=1000, help="holds N (default 1000)")
    parser.add_argument("--wait", type=int, default=2, help="wait= seconds W (default 2)")
    parser.add_argument("--spread", type=float, default=1.0,
                        help="seconds over which the holds arrive (default 1)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (default 1)")
    parser.add_argument("--content-id", type=int, default=1)


def run(args):
    raise_open_files(args.holds + 256)
    return run_async(lambda loop: Timeouts(args, loop).run())


class Timeouts(BenchRun):
    command = "timeouts"

    async def run(self):
        args = self.args
        progress(f"timeouts: {args.holds} holds, wait={args.wait}, over {args.spread:g} s, "
                 f"{args.rounds} round(s); hold budget {self.settings.hold_budget}")
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            database = fresh_database(args.database_url, Path(tmp))
            try:
                database.create(self.env)
                with server.service(database.url, self.flags, env=self.env, port=args.port,
                                    log_path=self.log_path("service")) as service:
                    control = Control(service.url, mint_token(self.env))
                    try:
                        await control.health()  # its connection before the holds'
                        for number in range(1, args.rounds + 1):
                            row = await self.round(service, control, number)
                            self.rows.append(row)
                            progress(table.text_row(row, COLUMNS))
                    finally:
                        await control.close()
            finally:
                database.drop()
        print(table.text_table(self.rows, COLUMNS))
        document = {**table.run_info("timeouts", args.argv, args.label),
                    "client_loop": self.loop_name,
                    "database": "postgresql" if args.database_url else "sqlite",
                    "settings": {k: v for k, v in vars(self.settings).items() if k != "secret"},
                    "rows": self.rows}
        path = args.json or args.results_dir / f"timeouts-{self.stamp}.json"
        progress(f"written: {table.write_json(path, document)}")
        return 0 if all(r["answered"] == r["holds"] and not r["early"] for r in self.rows) else 1

    async def round(self, service, control, number):
        args = self.args
        base, path = server.HOST, f"/contents/{args.content_id}/comments"
        conns = []
        try:
            cursor = None
            for _ in range(args.holds):
                conn = await Connection.open(base, service.port)
                conns.append(conn)
                first = await conn.get(f"{path}?wait=0", timeout=30)
                cursor = json.loads(first.body)["cursor"]
            answers_before = await control.answers() or {}
            before = service.usage()
            start = time.perf_counter() + 0.2
            results = await asyncio.gather(*(
                hold(conn, f"{path}?since={cursor}&wait={args.wait}",
                     start + i * args.spread / args.holds, args.wait)
                for i, conn in enumerate(conns)))
            after = service.usage()
            await asyncio.sleep(1.2)  # the metrics thread's copy
            answers_after = await control.answers() or {}
        finally:
            for conn in conns:
                conn.close()
        late = [ms for ms, _ in results if ms is not None]
        kinds = {k: answers_after.get(k, 0) - answers_before.get(k, 0) for k in answers_after}
        return {
            "round": number, "holds": args.holds, "wait_s": args.wait, "spread_s": args.spread,
            "answered": len(late), "errors": sum(ms is None for ms, _ in results),
            "not_timeouts": sum(not timeout for ms, timeout in results if ms is not None),
            "early": sum(ms < 0 for ms in late),
            "min_ms": min(late, default=None), "p50_ms": percentile(late, 50),
            "p99_ms": percentile(late, 99), "max_ms": max(late, default=None),
            "answers_by_kind": {k: v for k, v in kinds.items() if v},
            "cpu_s": after.cpu_s - before.cpu_s,
        }


async def hold(conn, target, when, wait):
    """(ms late: answer − send − wait, or None on failure; a timeout's answer?)"""
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    sent = time.perf_counter()
    try:
        resp = await conn.get(target, timeout=wait + 30)
        page = json.loads(resp.body)
    except (*ERRORS, ValueError):
        return None, False
    timeout = resp.status == 200 and not page.get("comments") and not page.get("poll_after_ms")
    return (resp.arrived - sent - wait) * 1e3, timeout


Column = table.Column
COLUMNS = [
    Column("round", "round"), Column("holds", "holds", width=5), Column("wait s", "wait_s"),
    Column("answered", "answered"), Column("errors", "errors"),
    Column("not timeouts", "not_timeouts"), Column("early", "early"),
    Column("min ms late", "min_ms"), Column("p50 ms late", "p50_ms"),
    Column("p99 ms late", "p99_ms"), Column("max ms late", "max_ms"),
    Column("CPU s", "cpu_s", 2),
]
