"""The stack's ceiling: requests/s the hello-world app answers under a closed loop.

C keep-alive connections each send a request as soon as the previous one is
answered, for N seconds after a short warm-up. From aiohttp in this process,
or from ``wrk`` when asked (and on PATH): a C client leaves the server more
of the 2 cores, so its figure is higher; compare runs made with the same tool.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass

import aiohttp

#: Seconds of load before counting: connections opened, threads warm.
WARMUP = 0.5


@dataclass
class Ceiling:
    tool: str
    connections: int
    seconds: float
    requests: int
    errors: int
    rps: float

    def ms_for(self, requests):
        """Milliseconds the stack needs just to answer ``requests`` requests."""
        return requests / self.rps * 1000 if self.rps else None

    def as_dict(self):
        return asdict(self)


async def measure(url, *, connections, seconds, tool="aiohttp"):
    if tool == "wrk":
        return await asyncio.to_thread(run_wrk, url, connections, seconds)
    return await closed_loop(url, connections, seconds)


async def closed_loop(url, connections, seconds):
    """Keep ``connections`` requests in flight for ``seconds``; count the answers."""
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter() + WARMUP
        end = start + seconds
        counts = await asyncio.gather(*(_client(session, url, start, end)
                                        for _ in range(connections)))
    requests = sum(ok for ok, _ in counts)
    return Ceiling("aiohttp", connections, seconds, requests,
                   sum(errors for _, errors in counts), requests / seconds)


async def _client(session, url, start, end):
    ok = errors = 0
    while time.perf_counter() < end:
        try:
            async with session.get(url) as resp:
                await resp.read()
                good = resp.status == 200
        except (TimeoutError, aiohttp.ClientError):
            good = False
        # Count the answers that came inside the window, after the warm-up.
        if start <= time.perf_counter() <= end:
            ok += good
            errors += not good
    return ok, errors


def run_wrk(url, connections, seconds):
    if shutil.which("wrk") is None:
        raise RuntimeError("--ceiling-tool wrk: wrk is not on PATH (Debian package wrk)")
    # One thread: the bench's client is one process too.
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", url + "/"]
    subprocess.run([*command[:3], "-d1s", url + "/"], capture_output=True, timeout=30)  # warm-up
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30).stdout
    # wrk's own summary lines, e.g. "  12345 requests in 5.00s, ..." and "Requests/sec: 2469.00".
    total = re.search(r"(\d+) requests in ([\d.]+)s", out)
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not (total and rate):
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    return Ceiling("wrk", connections, float(total[2]), int(total[1]),
                   int(errors[1]) if errors else 0, float(rate[1]))
