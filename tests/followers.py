"""Followers of one content's feed over real sockets, for the concurrency
and fault tests: long-poll followers multiplexed in one thread, each
following its cursor, and SSE followers, a thread each, resuming with
``Last-Event-ID`` whenever a stream ends. Either kind may be told to drop
its connection now and then (mid-hold, mid-stream) and resume from what it
had. Each records every change it received, in order, so a test can ask
whether every follower got every comment exactly once, in seq order.
Tests import it as ``from followers import …``.
"""

from __future__ import annotations

import json
import random
import selectors
import socket
import threading
import time
from collections import Counter

from rawhttp import parse_response
from sse_client import SSEClient

#: Pause before retrying after a 503 or a lost connection (Retry-After is
#: 2 s; the tests' outages are short).
RETRY_PAUSE = 0.2


class Follower:
    """What one follower received: ``seen`` is [(seq, comment id)] in order."""

    def __init__(self, name, since):
        self.name = name
        self.cursor = since
        self.seen = []
        self.received_at = {}  # comment id -> when it first arrived (monotonic)
        self.answers = Counter()  # status (or "reset", "eof") -> count
        self.reconnects = 0

    def take(self, changes):
        now = time.monotonic()
        for change in changes:
            self.seen.append((change["seq"], change["id"]))
            self.received_at.setdefault(change["id"], now)

    def problems(self, expected):
        """How this follower's record differs from ``expected`` {id: seq}:
        (lost, duplicated, out of order)."""
        ids = [comment_id for _, comment_id in self.seen]
        seqs = [seq for seq, _ in self.seen]
        lost = len(expected.keys() - set(ids))
        duplicated = len(ids) - len(set(ids))
        disordered = sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b <= a)
        wrong = sum(1 for seq, comment_id in self.seen
                    if comment_id in expected and expected[comment_id] != seq)
        return lost, duplicated, disordered + wrong


def assert_exactly_once_in_order(followers, expected):
    """Every follower got every change of ``expected`` {id: seq} once, in seq order."""
    report = {f.name: f.problems(expected) for f in followers}
    bad = {name: found for name, found in report.items() if found != (0, 0, 0)}
    assert not bad, f"(lost, duplicated, out of order) by follower: {bad}"
    for follower in followers:
        assert [seq for seq, _ in follower.seen] == sorted(expected.values()), follower.name


class _Poll:
    """One long-poll follower's connection."""

    def __init__(self, follower):
        self.follower = follower
        self.sock = None
        self.buffer = bytearray()
        self.send_at = 0.0
        self.drop_at = float("inf")


class LongPollFollowers:
    """``count`` long-poll followers of ``content_id``, from ``since``.

    ``drop()``, if given, says how many seconds a connection lives before
    the follower closes it (whatever it is waiting for) and resumes from its
    cursor on a new one.
    """

    def __init__(self, port, content_id, count, since=0, *, wait=5, limit=200, drop=None,
                 name="poll"):
        self.port = port
        self.content_id = content_id
        self.wait = wait
        self.limit = limit
        self.drop = drop
        self.followers = [Follower(f"{name}{n}", since) for n in range(count)]
        self._polls = [_Poll(f) for f in self.followers]
        self._selector = selectors.DefaultSelector()
        self._target = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"followers-{name}", daemon=True)
        self.error = None

    def start(self):
        self._thread.start()
        return self

    def finish(self, target, timeout):
        """Wait until every follower's cursor reaches ``target``; stop."""
        self._target = target
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.error is None:
            if all(f.cursor >= target for f in self.followers):
                break
            time.sleep(0.02)
        self.stop()
        return self.followers

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        for poll in self._polls:
            if poll.sock is not None:
                poll.sock.close()
        self._selector.close()
        if self.error is not None:
            raise self.error

    def _close(self, poll):
        if poll.sock is not None:
            self._selector.unregister(poll.sock)
            poll.sock.close()
            poll.sock = None

    def _connect(self, poll):
        self._close(poll)
        poll.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        poll.sock.setblocking(False)
        poll.buffer.clear()
        self._selector.register(poll.sock, selectors.EVENT_READ, poll)
        poll.drop_at = time.monotonic() + self.drop() if self.drop else float("inf")

    def _send(self, poll):
        if poll.sock is None:
            try:
                self._connect(poll)
            except OSError:
                self._retry(poll, "connect failed")
                return
        request = (f"GET /contents/{self.content_id}/comments?since={poll.follower.cursor}"
                   f"&limit={self.limit}&wait={self.wait} HTTP/1.1\r\nHost: x\r\n\r\n")
        poll.send_at = None
        try:
            poll.sock.sendall(request.encode())
        except OSError:
            self._retry(poll, "send failed")

    def _retry(self, poll, why):
        """The connection is lost: pause, then reconnect and ask again."""
        poll.follower.answers[why] += 1
        poll.follower.reconnects += 1
        self._close(poll)
        poll.drop_at = float("inf")
        poll.send_at = time.monotonic() + RETRY_PAUSE

    def _answer(self, poll, response):
        follower = poll.follower
        follower.answers[response.status] += 1
        if response.status == 200:
            page = response.json
            if page["reset"]:
                follower.answers["reset"] += 1
            follower.take(page["comments"])
            follower.cursor = page["cursor"]
            poll.send_at = time.monotonic() + page["poll_after_ms"] / 1000
        else:  # 503 while the database is away: come back soon
            poll.send_at = time.monotonic() + RETRY_PAUSE
        if response.headers.get("connection", "").lower() == "close":
            self._close(poll)  # the next request opens a new one

    def _run(self):
        try:
            for poll in self._polls:
                self._connect(poll)
                self._send(poll)
            while not self._stop.is_set():
                now = time.monotonic()
                for poll in self._polls:
                    if now >= poll.drop_at:
                        poll.follower.reconnects += 1
                        self._connect(poll)  # dropped mid-wait: ask again from the cursor
                        poll.send_at = now
                    if poll.send_at is not None and now >= poll.send_at:
                        self._send(poll)
                for key, _ in self._selector.select(0.02):
                    poll = key.data
                    try:
                        data = poll.sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self._retry(poll, "eof")
                        continue
                    poll.buffer += data
                    parsed = parse_response(poll.buffer)
                    if parsed is not None:
                        response, used = parsed
                        del poll.buffer[:used]
                        self._answer(poll, response)
        except Exception as exc:  # noqa: BLE001 - raised again by stop()
            self.error = exc


class SSEFollowers:
    """``count`` event-stream followers of ``content_id``, a thread each,
    resuming with ``Last-Event-ID`` when a stream ends, fails or is
    dropped (after ``drop()`` seconds, if given)."""

    def __init__(self, port, content_id, count, since=0, *, drop=None, name="sse"):
        self.port = port
        self.content_id = content_id
        self.drop = drop
        self.followers = [Follower(f"{name}{n}", since) for n in range(count)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._follow, args=(f,), daemon=True,
                                          name=f"followers-{f.name}") for f in self.followers]
        self._target = float("inf")
        self.errors = []

    def start(self):
        for thread in self._threads:
            thread.start()
        return self

    def finish(self, target, timeout):
        self._target = target
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.errors:
            if all(f.cursor >= target for f in self.followers):
                break
            time.sleep(0.02)
        self.stop()
        return self.followers

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        assert not self.errors, self.errors

    def _follow(self, follower):
        try:
            while not (self._stop.is_set() or follower.cursor >= self._target):
                self._stream(follower)
        except Exception as exc:  # noqa: BLE001 - raised again by stop()
            self.errors.append(f"{follower.name}: {exc!r}")

    def _stream(self, follower):
        path = f"/contents/{self.content_id}/comments/stream"
        try:
            client = SSEClient(self.port, path, headers={"Last-Event-ID": str(follower.cursor)})
        except OSError:
            follower.answers["connect failed"] += 1
            time.sleep(RETRY_PAUSE)
            return
        drop_at = time.monotonic() + self.drop() if self.drop else float("inf")
        try:
            try:
                status = client.head(timeout=10)
            except (AssertionError, OSError):
                follower.answers["no head"] += 1
                time.sleep(RETRY_PAUSE)
                return
            follower.answers[status] += 1
            if status != 200:  # 503: no stream now (the database is away)
                time.sleep(RETRY_PAUSE)
                return
            while not (self._stop.is_set() or follower.cursor >= self._target):
                wait = min(0.5, drop_at - time.monotonic())
                if wait <= 0:
                    follower.answers["dropped"] += 1
                    return
                event = client.next_event(timeout=wait)
                if event is None:
                    if client.ended or client.eof:
                        # As a browser does (after retry:), pause before resuming.
                        follower.answers["ended"] += 1
                        time.sleep(RETRY_PAUSE)
                        return
                    continue
                if event.event == "message":  # a comment or a tombstone
                    follower.take([json.loads(event.data)])
                elif event.event == "reset":
                    follower.answers["reset"] += 1
                if event.id is not None:
                    follower.cursor = event.id
        finally:
            client.close()
            if not (self._stop.is_set() or follower.cursor >= self._target):
                follower.reconnects += 1


def dropper(low, high, seed=0):
    """``drop()`` for followers: a connection lives low..high seconds."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def drop():
        with lock:
            return rng.uniform(low, high)

    return drop
