"""The event's paths, as its viewers and its writer meet them.

:class:`ServiceSide`: viewers of the service, directly or through a cache,
following their cursors and pausing ``poll_after_ms`` as the browser client
does; posts to the service. :class:`NchanSide`: Nchan's long-poll
subscribers, a channel per content; posts to its publisher. Each follows a
viewer, posts comment ``k``, says when every viewer is ready and what
reached the service upstream; :mod:`.event` runs them and counts.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from yarl import URL

from .connection import ERRORS, Connection
from .load import session
from .nchan import next_headers, subscribers_of
from .viewers import Control


class ServiceSide:
    """Viewers of the service (directly or through a cache at ``url``)."""

    HEADERS = {"Accept-Encoding": "gzip"}  # pages past the gzip threshold, as a browser asks

    def __init__(self, url, service_url, token):
        base = URL(url)
        self.host, self.port = base.host, base.port
        self.service_url = service_url
        self.control = Control(service_url, token)  # /metrics, from the service itself
        # The writer's own pool: a slow POST does not queue the next behind it.
        self._posts = session(timeout=60)
        self._auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def close(self):
        await self.control.close()
        await self._posts.close()

    async def follow(self, crowd, viewer, delay):
        await asyncio.sleep(delay)  # connect in batches
        path = f"/contents/{viewer.content}/comments"
        conn = None
        try:
            while True:
                target = (f"{path}?wait=0" if viewer.cursor is None
                          else f"{path}?since={viewer.cursor}")
                try:
                    if conn is None or conn.closed:
                        conn = await Connection.open(self.host, self.port)
                    resp = await conn.get(target, self.HEADERS, timeout=60)
                    if resp.status != 200:
                        raise ValueError(f"HTTP {resp.status}")
                    ks, cursor, pause = crowd.page(resp)
                except (*ERRORS, ValueError) as exc:
                    crowd.error(str(exc) if isinstance(exc, ValueError) else type(exc).__name__)
                    if conn is not None:
                        conn.close()
                    await asyncio.sleep(1.0)
                    continue
                # The first page is history, not the event's.
                crowd.deliver(viewer, ks if viewer.cursor is not None else (), resp.arrived)
                viewer.cursor = cursor
                if pause:
                    await asyncio.sleep(pause / 1000)
        finally:
            if conn is not None:
                conn.close()

    async def ready(self, crowd):
        return all(viewer.cursor is not None for viewer in crowd.viewers)

    async def upstream(self):
        """Feed answers the service gave so far (every kind), or None."""
        answers = await self.control.answers()
        return None if answers is None else sum(answers.values())

    async def publish(self, crowd, k):
        """POST comment k to the service; (stored?, round trip ms)."""
        url = f"{self.service_url}/contents/{crowd.content_of(k)}/comments"
        data = json.dumps({"body": crowd.body(k)})
        crowd.sent[k] = sent = time.perf_counter()
        try:
            async with self._posts.post(url, data=data, headers=self._auth) as resp:
                await resp.read()
                return resp.status == 201, (time.perf_counter() - sent) * 1e3
        except (TimeoutError, aiohttp.ClientError):
            return False, None


class NchanSide:
    """Nchan's long-poll subscribers, a channel per content."""

    def __init__(self, url, tag):
        base = URL(url)
        self.url, self.host, self.port = url, base.host, base.port
        self.tag = tag
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    def channel(self, content):
        return f"{self.tag}c{content}"

    async def close(self):
        await self._session.close()

    async def follow(self, crowd, viewer, delay):
        await asyncio.sleep(delay)
        path, headers = f"/sub/{self.channel(viewer.content)}", {}
        conn = None
        try:
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = await Connection.open(self.host, self.port)
                    viewer.cursor = viewer.cursor or "subscribed"
                    resp = await conn.get(path, headers, timeout=60)
                except ERRORS as exc:
                    crowd.error(type(exc).__name__)
                    if conn is not None:
                        conn.close()
                    await asyncio.sleep(1.0)
                    continue
                if resp.status in (304, 408):
                    continue  # Nchan's own timeout: ask again from the same cursor
                if resp.status != 200:
                    crowd.error(f"HTTP {resp.status}")
                    await asyncio.sleep(1.0)
                    continue
                headers = next_headers(resp)
                crowd.deliver(viewer, crowd.messages(resp), resp.arrived)
        finally:
            if conn is not None:
                conn.close()

    async def ready(self, crowd):
        counts = [await subscribers_of(self._session, self.url, self.channel(content))
                  for content in range(1, crowd.contents + 1)]
        return None not in counts and sum(counts) == len(crowd.viewers)

    async def upstream(self):
        return None

    async def publish(self, crowd, k):
        body = crowd.body(k)
        crowd.sent[k] = sent = time.perf_counter()
        try:
            async with self._session.post(
                    f"{self.url}/pub/{self.channel(crowd.content_of(k))}", data=body.encode(),
                    headers={"Content-Type": "text/plain"}) as resp:
                await resp.read()
                return resp.status in (200, 201, 202), (time.perf_counter() - sent) * 1e3
        except (TimeoutError, aiohttp.ClientError):
            return False, None
