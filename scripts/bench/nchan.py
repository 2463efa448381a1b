"""The fan-out's Nchan column: V long-poll subscribers of one Nchan channel.

The same client as the service's viewers (a keep-alive
:class:`~.connection.Connection` each, the arrival clock read when an
answer is complete), following
Nchan's long-poll cursor: each answer's ``Last-Modified`` and ``Etag`` go
back as ``If-Modified-Since`` and ``If-None-Match`` (:func:`next_headers`);
an answer is one message, or with multipart on every message since the
cursor (:func:`messages`). A trial uses a fresh
channel; once Nchan counts V subscribers, W messages are published and
each subscriber's answer is timed from just before the publish.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import psutil
from yarl import URL

from .connection import ERRORS, Connection
from .trial import busy_seconds, latency_figures


class Subscribers:
    def __init__(self, base_url, channel, count, posts, connect_batch):
        base = URL(base_url)
        self.host, self.port = base.host, base.port
        self.path = f"/sub/{channel}"
        self.arrivals = [[None] * posts for _ in range(count)]
        self.sent = [None] * posts
        self.duplicates = 0
        self.errors = []
        self.complete = asyncio.Event()
        self._missing = count * posts
        self._batch = connect_batch
        self._connections = []
        self._tasks = []

    def start(self):
        self._tasks = [asyncio.create_task(self._follow(i)) for i in range(len(self.arrivals))]

    async def close(self):
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self._connections:
            conn.close()

    async def _follow(self, index):
        headers = {}
        # In batches: V connections at once would overflow the listen backlog.
        await asyncio.sleep(index // self._batch * 0.1)
        conn = None
        while True:
            try:
                if conn is None or conn.closed:
                    conn = await Connection.open(self.host, self.port)
                    self._connections.append(conn)
                resp = await conn.get(self.path, headers, timeout=60)
            except ERRORS as exc:
                self.errors.append(f"GET: {exc!r}")
                if conn is not None:
                    conn.close()
                await asyncio.sleep(1.0)
                continue
            if resp.status == 304 or resp.status == 408:
                continue  # Nchan's own timeout: ask again from the same cursor
            if resp.status != 200:
                self.errors.append(f"GET answered {resp.status}")
                await asyncio.sleep(1.0)
                continue
            headers = next_headers(resp)
            await asyncio.sleep(0)  # let the others read the clock first
            for message in messages(resp):
                self._deliver(index, json.loads(message)["k"], resp.arrived)

    def _deliver(self, index, k, arrived):
        if self.arrivals[index][k] is not None:
            self.duplicates += 1
            return
        self.arrivals[index][k] = arrived
        self._missing -= 1
        if self._missing == 0:
            self.complete.set()

    def latencies(self):
        return [(arrived - self.sent[k]) * 1e3 for viewer in self.arrivals
                for k, arrived in enumerate(viewer) if arrived is not None]


def next_headers(resp):
    """The cursor of an answer, as the next long-poll's request headers."""
    return {"If-Modified-Since": resp.headers.get("last-modified", ""),
            "If-None-Match": resp.headers.get("etag", "")}


def messages(resp):
    """The messages (bytes) of a 200 answer: its body, or each part of a
    multipart/mixed one."""
    kind = resp.headers.get("content-type", "")
    if not kind.startswith("multipart/"):
        return [resp.body]
    boundary = b"--" + kind.split("boundary=", 1)[1].strip().strip('"').encode("latin-1")
    out = []
    for part in resp.body.split(boundary)[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        _, _, data = part.partition(b"\r\n\r\n")  # the part's own headers, then its data
        out.append(data[:-2] if data.endswith(b"\r\n") else data)
    return out


async def subscribers_of(session, base_url, channel):
    """Nchan's subscriber count for the channel (its publisher GET), or None."""
    try:
        async with session.get(f"{base_url}/pub/{channel}",
                               headers={"Accept": "text/json"}) as resp:
            if resp.status != 200:
                return None
            return json.loads(await resp.read()).get("subscribers")
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return None


async def run_nchan_trial(plan, nchan, v, number):
    """A fan-out row for V Nchan subscribers (the same columns as the service's)."""
    channel = f"{plan.tag}v{v}t{number}"
    audience = Subscribers(nchan.url, channel, v, plan.posts, plan.connect_batch)
    row = {"V": v, "trial": number, "status": "ok", "expected": v * plan.posts}
    control = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                    timeout=aiohttp.ClientTimeout(total=30))
    started = time.perf_counter()
    try:
        audience.start()
        deadline = started + plan.timeout / 2
        while time.perf_counter() < deadline:
            row["held"] = await subscribers_of(control, nchan.url, channel)
            if row["held"] == v:
                break
            await asyncio.sleep(0.2)
        else:
            row["status"] = "held not reached"
        row["setup_s"] = time.perf_counter() - started
        await asyncio.sleep(plan.settle)
        before, machine_before = nchan.usage(), psutil.cpu_times()
        statuses, post_ms = [], []
        first = time.perf_counter()
        for k in range(plan.posts):
            await asyncio.sleep(max(0.0, first + k * plan.post_gap - time.perf_counter()))
            audience.sent[k] = sent = time.perf_counter()
            async with control.post(f"{nchan.url}/pub/{channel}", data=json.dumps({"k": k}),
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                statuses.append(resp.status)
            post_ms.append((time.perf_counter() - sent) * 1e3)
        try:
            await asyncio.wait_for(audience.complete.wait(), plan.timeout)
        except TimeoutError:
            pass
        await asyncio.sleep(plan.tail)
        after = nchan.usage()
        busy = busy_seconds(psutil.cpu_times()) - busy_seconds(machine_before)
        row.update(cpu_s=after.cpu_s - before.cpu_s, rss_mb=before.rss_mb, post_status=statuses,
                   post_ms=max(post_ms), other_cpu_s=None, machine_busy_s=busy)
    finally:
        await audience.close()
        await control.close()
    held = audience.latencies()
    row.update(delivered=len(held), shed=0, duplicates=audience.duplicates,
               errors=len(audience.errors), error_sample=sorted(set(audience.errors))[:3],
               _held=held, _shed=[], **latency_figures(held, []))
    if row["delivered"] < row["expected"] and row["status"] == "ok":
        row["status"] = "timeout"
    return row
