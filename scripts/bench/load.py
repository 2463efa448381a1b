"""Closed-loop load from this process: C clients, each sending its next request
as soon as the previous one is answered, with every answer's latency."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from .table import percentile

#: Seconds of load before counting: connections opened, threads warm.
WARMUP = 0.5


@dataclass
class Load:
    """What C clients got in ``seconds`` (after the warm-up)."""

    clients: int
    seconds: float
    statuses: Counter = field(default_factory=Counter)
    _latencies: list = field(default_factory=list)

    @property
    def requests(self):
        return sum(self.statuses.values())

    def figures(self, ok=(200,)):
        good = sum(n for status, n in self.statuses.items() if status in ok)
        return {"clients": self.clients, "seconds": self.seconds, "requests": self.requests,
                "ok": good, "rps": good / self.seconds,
                "statuses": {str(k): v for k, v in self.statuses.items()},
                "p50_ms": percentile(self._latencies, 50),
                "p99_ms": percentile(self._latencies, 99),
                "max_ms": max(self._latencies, default=None)}


def session(limit=0, timeout=30):
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=timeout),
                                 cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)


async def closed_loop(requests, seconds, warmup=WARMUP):
    """Run each of ``requests`` (a coroutine function answering a status) in a
    loop of its own for ``warmup`` + ``seconds``; count what came in the window."""
    load = Load(len(requests), seconds)
    start = time.perf_counter() + warmup
    end = start + seconds

    async def client(request):
        while time.perf_counter() < end:
            sent = time.perf_counter()
            try:
                status = await request()
            except (TimeoutError, aiohttp.ClientError) as exc:
                status = type(exc).__name__
            done = time.perf_counter()
            if start <= done <= end:
                load.statuses[status] += 1
                load._latencies.append((done - sent) * 1e3)

    await asyncio.gather(*(client(request) for request in requests))
    return load


def get(http, url):
    async def request():
        async with http.get(url) as resp:
            await resp.read()
            return resp.status
    return request


def post(http, url, token, bodies):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    numbers = iter(range(10**9))

    async def request():
        data = bodies(next(numbers))
        async with http.post(url, data=data, headers=headers) as resp:
            await resp.read()
            return resp.status
    return request
