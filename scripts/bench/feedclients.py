"""The ``feeds`` command's viewers, in client processes of their own.

A viewer follows its contents over one connection (:class:`Follower`,
``/comments?feeds=``) or one connection per content
(:class:`SingleFollower`); :class:`Clients` runs them in processes of their
own, at most :data:`CONNECTIONS_PER_CLIENT` connections each, and asks them
how far they are. The command itself (:mod:`.feeds`) starts the service,
posts and reports.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import multiprocessing

import psutil
from yarl import URL

from .common import raise_open_files, run_async
from .connection import ERRORS, Connection

#: Connections opening at once, and the pause between batches (seconds).
CONNECT_BATCH, CONNECT_PAUSE = 200, 0.1
#: Most viewer connections per client process (see :class:`Clients`).
CONNECTIONS_PER_CLIENT = 12000


class Viewer:
    """A person: the comments of its contents, whichever connection brought them."""

    __slots__ = ("contents", "seen", "duplicates", "errors")

    def __init__(self, contents):
        self.contents = contents
        self.seen = {}  # comment body -> arrival (perf_counter)
        self.duplicates = 0
        self.errors = 0  # requests that failed or answered no page


class Follower:
    """One connection of a viewer and the cursors it follows ({content: cursor})."""

    __slots__ = ("viewer", "cursors")

    def __init__(self, viewer, contents):
        self.viewer = viewer
        self.cursors = dict.fromkeys(contents)

    @property
    def ready(self):
        return None not in self.cursors.values()

    def target(self):
        """The next request's path and query: every feed, bare at first."""
        if not self.ready:
            return f"/comments?feeds={','.join(map(str, self.cursors))}"
        return "/comments?feeds=" + ",".join(f"{c}:{s}" for c, s in self.cursors.items())

    def take(self, document, arrived):
        """Take one answer's comments and cursors; its pause (ms), or None if no page."""
        pages = document.get("feeds") if "feeds" in document else [document]
        if not pages or "cursor" not in pages[0]:
            return None
        viewer = self.viewer
        for page in pages:
            content = page["content_id"]
            if self.cursors.get(content, None) is not None:  # the first page is history
                for comment in page["comments"]:
                    body = comment.get("body")
                    if body in viewer.seen:
                        viewer.duplicates += 1
                    elif body is not None:
                        viewer.seen[body] = arrived
            self.cursors[content] = page["cursor"]
        return document["poll_after_ms"]


class SingleFollower(Follower):
    """A connection per content: the single read of one feed."""

    __slots__ = ()

    def target(self):
        [(content, cursor)] = self.cursors.items()
        path = f"/contents/{content}/comments"
        return f"{path}?wait=0" if cursor is None else f"{path}?since={cursor}"


class Clients:
    """The viewers, in client processes of their own (at most
    :data:`CONNECTIONS_PER_CLIENT` connections each: a process may not open
    more files than its hard limit, 20,000 here); this process posts. Each
    answers ``ask(what)``: "ready" (connections with their cursors), "mark"
    (requests so far, and its own CPU seconds), "stop" (each viewer's
    arrivals, duplicates, errors)."""

    def __init__(self, base_url, mode, contents, connections):
        context = multiprocessing.get_context("spawn")
        parts = max(1, math.ceil(connections / CONNECTIONS_PER_CLIENT))
        size = math.ceil(len(contents) / parts)
        self.pipes, self.processes = [], []
        for start in range(0, len(contents), size):
            mine, theirs = context.Pipe()
            process = context.Process(target=client_process, daemon=True,
                                      args=(theirs, base_url, mode, contents[start:start + size]))
            process.start()
            self.pipes.append(mine)
            self.processes.append(process)

    async def ask(self, what):
        """Every client's answer to ``what``, summed (or joined, for "stop")."""
        def exchange(pipe):
            pipe.send(what)
            return pipe.recv()

        answers = await asyncio.gather(*(asyncio.to_thread(exchange, p) for p in self.pipes))
        if what == "stop":
            return [viewer for answer in answers for viewer in answer]
        if what == "mark":
            return tuple(map(sum, zip(*answers, strict=True)))
        return sum(answers)

    async def stop(self):
        try:
            return await self.ask("stop")
        finally:
            for process in self.processes:
                await asyncio.to_thread(process.join, 10)
                if process.is_alive():
                    process.kill()


def client_process(pipe, base_url, mode, contents):
    """A client process: its viewers (each following ``contents[i]``) until "stop"."""
    raise_open_files(len(contents) * len(contents[0]) + 256)
    run_async(lambda loop: _client(pipe, base_url, mode, contents))


async def _client(pipe, base_url, mode, contents):
    viewers = [Viewer(followed) for followed in contents]
    if mode == "one":
        followers = [Follower(viewer, viewer.contents) for viewer in viewers]
    else:
        followers = [SingleFollower(viewer, [content])
                     for viewer in viewers for content in viewer.contents]
    requests = [0]
    tasks = [asyncio.create_task(follow(base_url, follower, requests, i))
             for i, follower in enumerate(followers)]
    me = psutil.Process()
    try:
        while True:
            what = await asyncio.to_thread(pipe.recv)
            if what == "ready":
                pipe.send(sum(f.ready for f in followers))
            elif what == "mark":
                times = me.cpu_times()
                pipe.send((requests[0], times.user, times.system))
            else:
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    pipe.send([(v.seen, v.duplicates, v.errors) for v in viewers])


async def follow(base_url, follower, requests, index):
    """Follow one connection's feeds until cancelled: each answer's comments
    noted on its viewer (first arrival; repeats counted), its pause kept."""
    await asyncio.sleep(index // CONNECT_BATCH * CONNECT_PAUSE)  # connect in batches
    base = URL(base_url)
    # Pages past the service's gzip threshold come compressed, as a browser asks.
    headers = {"Accept-Encoding": "gzip"}
    conn = None
    viewer = follower.viewer
    try:
        while True:
            try:
                if conn is None or conn.closed:
                    conn = await Connection.open(base.host, base.port)
                resp = await conn.get(follower.target(), headers, timeout=60)
                raw = resp.body
                if resp.headers.get("content-encoding") == "gzip":
                    raw = gzip.decompress(raw)
                document = json.loads(raw)
            except (*ERRORS, ValueError):
                viewer.errors += 1
                if conn is not None:
                    conn.close()
                await asyncio.sleep(1.0)
                continue
            requests[0] += 1
            await asyncio.sleep(0)  # let the connections answered with this one read the clock
            pause = follower.take(document, resp.arrived)
            if pause is None:
                viewer.errors += 1  # an error document: 503 while draining, say
                await asyncio.sleep(1.0)
            elif pause:
                await asyncio.sleep(pause / 1000)
    finally:
        if conn is not None:
            conn.close()
