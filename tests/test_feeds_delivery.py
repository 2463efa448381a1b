"""Several feeds over one connection, delivered exactly once and in order
per feed, through a restart of the service (issue 16's proof).

Ten writers post to ten contents over HTTP, now and then deleting one of
their comments (a tombstone at a new seq); thirty followers each follow a different subset of three to seven of
them over **one** connection: fifteen long-poll ``/comments?feeds=`` and
fifteen stream ``/comments/stream?feeds=``. Midway the service restarts (a
second app and server over the same PostgreSQL database, on a new port;
the first one's app closed while its server cuts every connection, so a
follower may meet an end of stream, a 503, a cut connection or a refused
one). The long-poll followers resume from the cursors of the last answer
they got; the stream followers reconnect to the URL they first asked for,
with the ``Last-Event-ID`` of the last event they got, as a browser's
``EventSource`` does. Every follower must end with every change of every
content it follows (each comment and tombstone stored), exactly once, in
seq order per content, and never a change of a content it does not follow.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

import pytest
from conftest import SECRET
from sse_client import SSEClient
from test_hold import wait_for

from service.db.store import Store, create_engine
from service.db.values import Comment
from service.web.auth import TokenSigner

CONTENTS = tuple(range(201, 211))
WRITERS = 10
FOLLOWERS = 30
#: Seconds of writing before and after the restart.
PHASE = 4.0
#: Seconds between one writer's posts (ten writers: about 65 posts a second).
POST_INTERVAL = 0.15
#: A writer deletes one of its live comments after every DELETE_EVERY posts.
DELETE_EVERY = 5
#: Pause before retrying after a lost connection or a 503.
RETRY_PAUSE = 0.2
SIGNER = TokenSigner(SECRET)


class Service:
    """Where the service is now: followers and writers read ``port`` at
    every (re)connection, so they follow it through the restart."""

    def __init__(self, port):
        self.port = port


def parse_cursors(text):
    """``42:18,43:5`` as ``{42: 18, 43: 5}`` (a bare ``44``: None)."""
    out = {}
    for part in text.split(","):
        content, _, since = part.partition(":")
        out[int(content)] = int(since) if since else None
    return out


class FeedsFollower:
    """One follower of several contents: ``seen[content]`` is [(seq, id,
    deleted)] in the order received; ``problems`` lists whatever broke the contract
    on the way (an answer missing a feed, a change of a content it does not
    follow, a reset)."""

    def __init__(self, name, contents, bare):
        self.name = name
        self.contents = tuple(sorted(contents))
        #: Cursors: None for a content first named bare (its latest page).
        self.cursors = {c: (None if c in bare else 0) for c in self.contents}
        self.seen = {c: [] for c in self.contents}
        self.answers = Counter()
        self.problems = []
        self.targets = None  # {content: last seq}, once the writers stopped
        self.on = False  # had its first answer (or its stream's first event)
        self.ports = set()  # the ports that answered it 200

    def take(self, content_id, changes):
        if content_id not in self.seen:
            self.problems.append(f"a change of content {content_id}, not followed")
            return
        self.seen[content_id] += [(c["seq"], c["id"], c["deleted"]) for c in changes]

    def done(self):
        return self.targets is not None and all(
            (self.cursors[c] or 0) >= self.targets[c] for c in self.contents)

    def first_feeds(self):
        return ",".join(str(c) if self.cursors[c] is None else f"{c}:0" for c in self.contents)


class LongPollFollower(FeedsFollower):
    """Follows with ``GET /comments?feeds=…`` on one keep-alive connection,
    its next request built from the last answer alone. Its first request
    lists the contents shuffled (the 307 to the canonical list is followed);
    some followers ask for small pages, so a backlog takes several answers."""

    def run(self, service, stop, rng):
        listed = list(self.contents)
        rng.shuffle(listed)
        first = ",".join(str(c) if self.cursors[c] is None else f"{c}:0" for c in listed)
        limit = rng.choice([3, 20, 200])
        path = f"/comments?feeds={first}&wait=2&limit={limit}"
        conn, port = None, None
        while not (stop.is_set() or self.done()):
            if conn is None or port != service.port:
                if conn is not None:
                    conn.close()
                port = service.port
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException):
                self.answers["lost"] += 1
                conn.close()
                conn = None
                time.sleep(RETRY_PAUSE)
                continue
            self.answers[resp.status] += 1
            if resp.status == 200:
                self.ports.add(port)
            if resp.status == 307:
                location = urlsplit(resp.getheader("Location"))
                path = f"{location.path}?{location.query}"
                continue
            if resp.status != 200:  # 503: the service is draining or away
                time.sleep(RETRY_PAUSE)
                continue
            answer = json.loads(body)
            pages = answer["feeds"]
            listed = tuple(page["content_id"] for page in pages)
            if listed != self.contents:
                self.problems.append(f"an answer listed {listed}, not {self.contents}")
                return
            for page in pages:
                if page["reset"]:
                    self.answers["reset"] += 1
                    self.problems.append(f"content {page['content_id']} was reset")
                if page["events"]:
                    self.problems.append(f"events on {page['content_id']}: {page['events']}")
                self.take(page["content_id"], page["comments"])
                self.cursors[page["content_id"]] = page["cursor"]
            self.on = True
            # The next request from this answer alone, as the contract says.
            feeds = ",".join(f"{page['content_id']}:{page['cursor']}" for page in pages)
            path = f"/comments?feeds={feeds}&wait=2&limit={limit}"
            if answer["poll_after_ms"]:
                stop.wait(answer["poll_after_ms"] / 1000)
        if conn is not None:
            conn.close()


class StreamFollower(FeedsFollower):
    """Follows with ``GET /comments/stream?feeds=…``: when a stream ends or
    breaks, it asks for the same URL again (on the service's port now) with
    the ``Last-Event-ID`` of the last event that carried an id."""

    def run(self, service, stop, rng):
        path = f"/comments/stream?feeds={self.first_feeds()}"
        last_id = None
        while not (stop.is_set() or self.done()):
            headers = {} if last_id is None else {"Last-Event-ID": last_id}
            try:
                client = SSEClient(service.port, path, headers=headers)
            except OSError:
                self.answers["connect failed"] += 1
                time.sleep(RETRY_PAUSE)
                continue
            try:
                try:
                    status = client.head(timeout=10)
                except (AssertionError, OSError):
                    self.answers["no head"] += 1
                    time.sleep(RETRY_PAUSE)
                    continue
                self.answers[status] += 1
                if status != 200:
                    time.sleep(RETRY_PAUSE)
                    continue
                self.ports.add(client.sock.getpeername()[1])
                while not (stop.is_set() or self.done()):
                    try:
                        event = client.next_event(timeout=0.5)
                    except OSError:
                        event = None
                    if event is None:
                        if client.ended or client.eof:
                            self.answers["ended"] += 1
                            time.sleep(RETRY_PAUSE)  # as a browser does, after retry:
                            break
                        continue
                    if event.event == "message":  # a comment or a tombstone
                        change = json.loads(event.data)
                        self.take(change["content_id"], [change])
                    elif event.event == "reset":
                        self.answers["reset"] += 1
                        self.problems.append(f"reset: {event.data[:200]}")
                    elif event.event in ("ban", "unban", "closed"):
                        self.problems.append(f"unexpected {event.event} event: {event.data}")
                    if event.id is not None:
                        ids = parse_cursors(str(event.id))
                        if tuple(ids) != self.contents:
                            self.problems.append(f"an id {event.id} for {self.contents}")
                            return
                        if event.event == "message" and ids[change["content_id"]] != change["seq"]:
                            self.problems.append(f"id {event.id} for change {change}")
                        last_id = str(event.id)
                        self.cursors.update(ids)
                        self.on = True
            finally:
                client.close()


class Writer:
    """Posts to random contents every POST_INTERVAL seconds, deleting one
    of its own live comments after every DELETE_EVERY posts; keeps what
    was answered (201 posts, 2xx deletes)."""

    def __init__(self, number, service, rng):
        self.author = 100 + number
        self.auth = f"Bearer {SIGNER.mint(self.author)}"
        self.service = service
        self.rng = rng
        self.posted = {}  # id -> (content, seq) of every 201
        self.deleted = set()  # ids whose delete was answered 2xx
        self.statuses = Counter()

    def _send(self, conn, method, path, document=None):
        body = None if document is None else json.dumps(document)
        headers = {"Authorization": self.auth}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        raw = resp.read()
        self.statuses[f"{method} {resp.status}"] += 1
        return resp.status, (json.loads(raw) if raw else None)

    def run(self, stop):
        conn, port, n = None, None, 0
        started = time.monotonic()
        while not stop.wait(max(0.0, started + n * POST_INTERVAL - time.monotonic())):
            n += 1
            if conn is None or port != self.service.port:
                if conn is not None:
                    conn.close()
                port = self.service.port
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
            content = self.rng.choice(CONTENTS)
            try:
                status, doc = self._send(conn, "POST", f"/contents/{content}/comments",
                                         {"body": f"writer {self.author} comment {n}"})
                if status == 201:
                    self.posted[doc["id"]] = (content, doc["seq"])
                live = sorted(self.posted.keys() - self.deleted)
                if n % DELETE_EVERY == 0 and live:
                    victim = self.rng.choice(live)
                    where, _ = self.posted[victim]
                    status, _ = self._send(conn, "DELETE", f"/contents/{where}/comments/{victim}")
                    if 200 <= status < 300:
                        self.deleted.add(victim)
            except (OSError, http.client.HTTPException):
                self.statuses["cut"] += 1  # the restart: maybe stored, maybe not
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def stored_changes(url):
    """{content: [(seq, id, is a tombstone)]} of every stored change, by seq."""
    store = Store(create_engine(url))
    try:
        out = {}
        for content in CONTENTS:
            changes = store.changes_since(content, 0, 10**6)
            assert all(isinstance(c, Comment) for c in changes), "a moderation event"
            out[content] = [(c.seq, c.id, c.deleted) for c in changes]
        return out
    finally:
        store.dispose()


def feed_problems(got, stored, posted):
    """How one follower's record of one content, ``got`` [(seq, id,
    deleted)] as received, breaks exactly once in order, given the content's
    ``stored`` changes and the writers' answered ``posted`` {id: (content,
    seq)}; None if it does not.

    Every stored change (a comment at its seq, a tombstone at the seq its
    deletion took) must be received once, in seq order. A follower also
    gets, before the deletion, a comment that is a tombstone now: it may
    have it once, live, at the seq it was posted with."""
    problems = Counter()
    seqs = [seq for seq, _, _ in got]
    problems["out of order or twice"] = sum(1 for a, b in zip(seqs, seqs[1:], strict=False)
                                            if b <= a)
    received = Counter(got)
    problems["twice"] = sum(n - 1 for n in received.values())
    problems["lost"] = sum(1 for change in stored if change not in received)
    tombstones = {cid: seq for seq, cid, dead in stored if dead}
    for seq, cid, dead in received.keys() - set(stored):
        before_deletion = (not dead and cid in tombstones and seq < tombstones[cid]
                           and posted.get(cid, (None, None))[1] == seq)
        if not before_deletion:
            problems["never stored so"] += 1
    problems = {name: n for name, n in problems.items() if n}
    return f"{dict(problems)} of {len(stored)} stored, {len(got)} received" if problems else None


def choose_followers(rng):
    """Thirty followers, each of a different subset of 3..7 contents (some
    named bare: their latest page, or from now on a stream), the first half
    long-polling and the second streaming."""
    subsets = set()
    while len(subsets) < FOLLOWERS:
        subsets.add(tuple(sorted(rng.sample(CONTENTS, rng.randint(3, 7)))))
    followers = []
    for n, contents in enumerate(sorted(subsets, key=lambda s: rng.random())):
        bare = {c for c in contents if rng.random() < 0.3}
        kind = LongPollFollower if n < FOLLOWERS // 2 else StreamFollower
        followers.append(kind(f"{kind.__name__[:-8].lower()}{n}", contents, bare))
    return followers


@pytest.mark.slow
@pytest.mark.postgres
def test_many_feeds_exactly_once_in_order_through_a_restart(make_app_at, make_server, pg_url):
    rng = random.Random(16)
    options = {"threads": 80, "hold_budget": 60, "max_streams": 20, "poll_interval": 0.2,
               "sse_keepalive": 1, "max_wait": 5, "reset_after": 10**9}
    first = make_app_at(pg_url, **options)
    first_server = make_server(first)
    service = Service(first_server.adj.port)

    followers = choose_followers(rng)
    stop_following = threading.Event()
    threads = [threading.Thread(target=f.run, args=(service, stop_following,
                                                    random.Random(n)),
                                name=f"follower-{f.name}", daemon=True)
               for n, f in enumerate(followers)]
    for thread in threads:
        thread.start()
    # Every follower is on (its first answer, or its stream's first event)
    # before a write, so a content first named bare misses nothing.
    half = FOLLOWERS // 2
    wait_for(lambda: all(f.on for f in followers), 30,
             lambda: f"followers on: {[f.name for f in followers if not f.on]} are not")

    stop_writing = threading.Event()
    writers = [Writer(n, service, random.Random(1000 + n)) for n in range(WRITERS)]
    writer_threads = [threading.Thread(target=w.run, args=(stop_writing,), daemon=True,
                                       name=f"writer-{n}") for n, w in enumerate(writers)]
    started = time.monotonic()
    for thread in writer_threads:
        thread.start()
    time.sleep(PHASE)

    # The restart: the first server's connections cut (held reads,
    # streams, posts in flight), its app closed; a second app and server
    # over the same database, on a new port.
    cut = threading.Thread(target=first_server.shutdown)
    cut.start()
    first.close()
    cut.join(30)
    second = make_app_at(pg_url, **options)
    service.port = make_server(second).adj.port
    restarted = time.monotonic()
    time.sleep(PHASE)
    stop_writing.set()
    for thread in writer_threads:
        thread.join(30)
    written = time.monotonic()

    stored = stored_changes(pg_url)
    targets = {c: (changes[-1][0] if changes else 0) for c, changes in stored.items()}
    for follower in followers:
        follower.targets = targets
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
    stop_following.set()
    for thread in threads:
        thread.join(10)
    finished = time.monotonic()

    posted = {i: where for w in writers for i, where in w.posted.items()}
    deleted = set().union(*(w.deleted for w in writers))
    statuses = sum((w.statuses for w in writers), Counter())
    answers = sum((f.answers for f in followers), Counter())
    deliveries = sum(len(seen) for f in followers for seen in f.seen.values())
    print(f"\nMEASURED {len(posted)} comments answered 201 and {len(deleted)} deleted over "
          f"{len(CONTENTS)} contents ({sum(map(len, stored.values()))} changes stored); "
          f"writes {dict(statuses)}; {deliveries} deliveries checked to {len(followers)} "
          f"followers; follower answers {dict(answers)}; writing {written - started:.1f} s "
          f"(restart at {restarted - started:.1f} s), all delivered "
          f"{finished - written:.1f} s after")

    # The database: every answered post is there (at its seq, or moved on
    # as a tombstone), every answered delete a tombstone, and each
    # content's seqs, with the ones deletions left, are 1..N.
    tombstones = {cid for changes in stored.values() for _, cid, dead in changes if dead}
    assert deleted <= tombstones
    for content, changes in stored.items():
        live = {(seq, cid) for seq, cid, dead in changes if not dead}
        for comment_id, (where, seq) in posted.items():
            if where == content:
                assert (seq, comment_id) in live or comment_id in tombstones, comment_id
        left = {posted[cid][1] for _, cid, dead in changes if dead}
        seqs = sorted(left | {seq for seq, _, _ in changes})
        assert seqs == list(range(1, len(seqs) + 1)), content
    assert len(posted) >= 100 and deleted, (len(posted), len(deleted))

    # Every follower: every change of each content it follows, once, in
    # seq order, nothing else, no reset, no broken answer.
    assert sum(isinstance(f, StreamFollower) for f in followers) == half
    bad = {}
    for follower in followers:
        wrong = list(follower.problems)
        for content in follower.contents:
            found = feed_problems(follower.seen[content], stored[content], posted)
            if found:
                wrong.append(f"content {content}: {found}")
        if wrong:
            bad[follower.name] = wrong
    assert not bad, bad
    assert all(f.done() for f in followers)
    # Every follower was answered by both servers: it met the restart and resumed.
    ports = {first_server.adj.port, service.port}
    assert all(f.ports == ports for f in followers), {f.name: f.ports for f in followers}
