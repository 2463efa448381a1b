"""V viewers long-polling one content (a :class:`~.connection.Connection` each),
and the bench's control connection (aiohttp)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from yarl import URL

from .connection import ERRORS, Connection


class Viewer:
    __slots__ = ("idx", "cursor", "polling", "arrivals", "conn")

    def __init__(self, idx, posts):
        self.idx = idx
        self.conn = None  # its keep-alive connection, opened on first use
        self.cursor = None
        self.polling = False  # a long-poll is out: held, or on its way
        self.arrivals = [None] * posts  # perf_counter() when post k arrived


class Audience:
    """V viewers following one content's cursor, each on a keep-alive connection.

    Each viewer keeps its own connection (opened again if the server
    closes it), so V viewers keep V connections open.
    """

    def __init__(self, base_url, content_id, count, *, bodies, wait, connect_batch):
        base = URL(base_url)
        self.host, self.port = base.host, base.port
        self.url = f"/contents/{content_id}/comments"
        self.viewers = [Viewer(i, len(bodies)) for i in range(count)]
        self.bodies = bodies  # comment body -> index k of the post
        self.wait = wait
        self.sent = [None] * len(bodies)  # perf_counter() just before post k was sent
        self.shed = [set() for _ in bodies]  # viewers not held for post k
        self.shed_responses = 0
        self.ready = 0  # viewers that have their first cursor
        self.duplicates = 0
        self.errors = []
        self.complete = asyncio.Event()  # every viewer has every post
        self._missing = count * len(bodies)
        self._connecting = asyncio.Semaphore(connect_batch)
        self._tasks = []

    @property
    def holding(self):
        return sum(viewer.polling for viewer in self.viewers)

    def start(self):
        self._tasks = [asyncio.create_task(self._follow(viewer)) for viewer in self.viewers]

    async def close(self):
        """Cancel every viewer; their connections close, so the server frees their holds."""
        for task in self._tasks:
            task.cancel()
        for viewer in self.viewers:
            if viewer.conn is not None:
                viewer.conn.close()
        for result in await asyncio.gather(*self._tasks, return_exceptions=True):
            if not isinstance(result, asyncio.CancelledError):
                self.errors.append(f"viewer died: {result!r}")  # a bench bug: show it

    def before_post(self, k):
        """Post ``k`` is about to be sent: viewers without a long-poll out now are shed."""
        self.shed[k].update(viewer.idx for viewer in self.viewers if not viewer.polling)

    def posted(self, k, sent):
        self.sent[k] = sent

    def latencies(self):
        """Milliseconds from send to arrival: (held viewers', shed viewers')."""
        held, shed = [], []
        for k, sent in enumerate(self.sent):
            for viewer in self.viewers:
                arrived = viewer.arrivals[k]
                if arrived is not None and sent is not None:
                    (shed if viewer.idx in self.shed[k] else held).append((arrived - sent) * 1e3)
        return held, shed

    async def _follow(self, viewer):
        # Bounded connects: V at once would overflow the listen backlog.
        async with self._connecting:
            while viewer.cursor is None:
                answer = await self._get(viewer, f"{self.url}?wait=0")
                if answer is None:
                    await asyncio.sleep(1.0)
                else:
                    viewer.cursor = json.loads(answer[0])["cursor"]
        self.ready += 1
        while True:
            viewer.polling = True
            answer = await self._get(viewer, f"{self.url}?since={viewer.cursor}&wait={self.wait}")
            viewer.polling = False
            if answer is None:
                await asyncio.sleep(1.0)
                continue
            # Let every viewer answered in this loop iteration read the clock
            # before this one spends time on parsing and re-polling.
            await asyncio.sleep(0)
            body, arrived = answer
            page = json.loads(body)
            comments = page["comments"]
            if comments:
                self._deliver(viewer, comments, arrived)
            viewer.cursor = page["cursor"]
            pause = page["poll_after_ms"]
            if pause > 0:
                if not comments:
                    self._on_shed(viewer)
                await asyncio.sleep(pause / 1000)

    async def _get(self, viewer, target):
        """(body, arrival time) of one GET, or None after noting what went wrong."""
        try:
            if viewer.conn is None or viewer.conn.closed:
                viewer.conn = await Connection.open(self.host, self.port)
            resp = await viewer.conn.get(target, timeout=self.wait + 15)
        except ERRORS as exc:
            self.errors.append(f"GET: {exc!r}")
            if viewer.conn is not None:
                viewer.conn.close()
            return None
        if resp.status != 200:
            self.errors.append(f"GET answered {resp.status}: {resp.body[:200]!r}")
            return None
        return resp.body, resp.arrived

    def _deliver(self, viewer, comments, arrived):
        for comment in comments:
            k = self.bodies.get(comment.get("body"))
            if k is None:
                continue
            if viewer.arrivals[k] is not None:
                self.duplicates += 1
                continue
            viewer.arrivals[k] = arrived
            self._missing -= 1
            if self._missing == 0:
                self.complete.set()

    def _on_shed(self, viewer):
        self.shed_responses += 1
        for k, sent in enumerate(self.sent):
            if sent is not None and viewer.arrivals[k] is None:
                self.shed[k].add(viewer.idx)


class Control:
    """The bench's own keep-alive connection: /healthz and the posts."""

    def __init__(self, base_url, token):
        self.base_url = base_url
        self._auth = {"Authorization": f"Bearer {token}"}
        # One connection: the post goes out on the one /healthz kept open.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                              timeout=aiohttp.ClientTimeout(total=30))

    async def health(self):
        try:
            async with self._session.get(f"{self.base_url}/healthz") as resp:
                return await resp.json() if resp.status == 200 else None
        except (TimeoutError, aiohttp.ClientError):
            return None

    async def _metrics(self):
        """The service's /metrics lines (every worker's under --workers), or None."""
        try:
            async with self._session.get(f"{self.base_url}/metrics") as resp:
                return (await resp.read()).decode().splitlines()
        except (TimeoutError, aiohttp.ClientError):
            return None

    async def held(self):
        """Hold slots in use, from /metrics."""
        for line in await self._metrics() or ():
            if line.startswith("livecomments_held "):
                return round(float(line.split()[1]))
        return None

    async def answers(self):
        """Feed answers the service gave so far, by kind, from /metrics."""
        lines = await self._metrics()
        if lines is None:
            return None
        counts = {}
        for line in lines:
            if line.startswith("livecomments_feed_answers_total{"):
                labels, value = line.rsplit(" ", 1)
                kind = labels.split('kind="', 1)[1].split('"', 1)[0]
                counts[kind] = counts.get(kind, 0) + round(float(value))
        return counts

    async def post(self, content_id, body, on_send):
        """POST a comment; ``on_send(t)`` gets the clock read just before it goes.

        Returns (status, round trip ms).
        """
        url = f"{self.base_url}/contents/{content_id}/comments"
        sent = time.perf_counter()
        on_send(sent)
        try:
            async with self._session.post(url, json={"body": body}, headers=self._auth) as resp:
                await resp.read()
                return resp.status, (time.perf_counter() - sent) * 1e3
        except (TimeoutError, aiohttp.ClientError) as exc:
            return f"error: {exc!r}", None

    async def close(self):
        await self._session.close()
