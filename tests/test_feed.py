"""The hold's parts, without HTTP: Feed, Poller and FeedHub.

A fake store (plain Python, same semantics as ``service.store.Store`` for
the calls the hold makes) and a fake clock make every step explicit; the
only threads are the ones whose job is to block (a held reader) or to run
a poller's loop.
"""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import UTC, datetime

import sqlalchemy as sa
from conftest import make_settings

from service.feed import Feed
from service.hub import Draining, FeedHub, FeedQuery
from service.pages import Kind, Page
from service.poller import Poller
from service.store import Comment

CONTENT = 7


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class FakeStore:
    """The store calls the hold makes, in memory, with the real semantics:
    every change takes the content's next seq, a deletion moves the
    comment to a new seq as a tombstone. ``fail`` makes reads raise."""

    def __init__(self):
        self.rows = {}  # comment id -> Comment
        self.seqs = {}  # content id -> last seq
        self.fail = None
        self.calls = {"changes_since": 0, "current_seq": 0, "latest": 0}
        #: Called inside changes_since after its rows are read (races).
        self.during_read = None

    def add(self, body, content_id=CONTENT):
        seq = self.seqs[content_id] = self.seqs.get(content_id, 0) + 1
        comment = Comment(
            id=len(self.rows) + 1, content_id=content_id, author_id=1, body=body,
            created_at=datetime(2026, 1, 1, tzinfo=UTC), seq=seq, deleted=False,
        )
        self.rows[comment.id] = comment
        return comment

    def delete(self, comment_id):
        old = self.rows[comment_id]
        seq = self.seqs[old.content_id] = self.seqs[old.content_id] + 1
        tombstone = Comment(
            id=old.id, content_id=old.content_id, author_id=old.author_id, body=None,
            created_at=old.created_at, seq=seq, deleted=True,
        )
        self.rows[comment_id] = tombstone
        return tombstone

    def _read(self, name):
        self.calls[name] += 1
        if self.fail is not None:
            raise self.fail

    def _ordered(self, content_id):
        return sorted(
            (c for c in self.rows.values() if c.content_id == content_id), key=lambda c: c.seq
        )

    def changes_since(self, content_id, since, limit):
        self._read("changes_since")
        rows = [c for c in self._ordered(content_id) if c.seq > since][:limit]
        if self.during_read is not None:
            hook, self.during_read = self.during_read, None
            hook()
        return rows

    def current_seq(self, content_id):
        self._read("current_seq")
        return self.seqs.get(content_id, 0)

    def latest(self, content_id, limit):
        self._read("latest")
        live = [c for c in self._ordered(content_id) if not c.deleted]
        return live[-limit:], self.seqs.get(content_id, 0)

    def reads(self):
        return sum(self.calls.values())


def db_error():
    return sa.exc.OperationalError(
        "SELECT", {}, Exception("server closed the connection unexpectedly")
    )


def comment(seq, body=None, *, id=None, deleted=False):
    return Comment(
        id=seq if id is None else id, content_id=CONTENT, author_id=1,
        body=None if deleted else (body or f"comment {seq}"),
        created_at=datetime(2026, 1, 1, tzinfo=UTC), seq=seq, deleted=deleted,
    )


class Releases:
    """Records each call of a feed's ``settle`` (the hold budget): the
    slots freed per call, and the answers by kind."""

    def __init__(self):
        self.calls = []
        self.kinds = []

    def __call__(self, answered):
        self.calls.append(answered.total())
        self.kinds.append({kind.value: n for kind, n in answered.items()})


def make_feed(changes=(), floor=0, window_size=100, store=None):
    """A feed over ``changes``; its store holds them too, unless one is given."""
    if store is None:
        store = FakeStore()
        for change in changes:
            store.rows[change.id] = change
            store.seqs[CONTENT] = max(store.seqs.get(CONTENT, 0), change.seq)
    releases = Releases()
    feed = Feed(CONTENT, list(changes), floor, window_size=window_size, settle=releases,
                store=store)
    return feed, releases


def page(answer):
    """The decoded JSON of a Page (or of its body)."""
    return json.loads(answer.body if isinstance(answer, Page) else answer)


def seqs(answer):
    return [c["seq"] for c in page(answer)["comments"]]


# -- Feed ------------------------------------------------------------------


def test_publish_wakes_only_waiters_behind_the_new_seq_with_one_shared_body():
    feed, releases = make_feed([comment(1), comment(2), comment(3)])
    a = feed.hold(3, 50, deadline=60)
    b = feed.hold(3, 50, deadline=60)
    c = feed.hold(3, 1, deadline=60)
    ahead = feed.hold(5, 50, deadline=60)  # a cursor another process handed out
    assert feed.held == 4

    assert feed.publish([comment(4), comment(5)]) == 3

    assert a.event.is_set() and b.event.is_set() and c.event.is_set()
    assert not ahead.event.is_set()
    # Encoded once per (since, limit): the very same bytes object.
    assert a.page is b.page
    assert page(a.page) == {"content_id": CONTENT, "comments": page(a.page)["comments"],
                            "cursor": 5, "poll_after_ms": 0, "reset": False}
    assert seqs(a.page) == [4, 5]
    assert seqs(c.page) == [4] and page(c.page)["cursor"] == 4
    # The waker frees the three hold slots in one step, counting them.
    assert releases.calls == [3] and releases.kinds == [{"woken": 3}]
    assert feed.held == 1

    feed.publish([comment(6)])
    assert ahead.event.is_set() and seqs(ahead.page) == [6]
    assert releases.calls == [3, 1]


def test_a_writer_publishes_its_change_only_when_it_is_the_next_one():
    feed, releases = make_feed([comment(1), comment(2)])
    viewer = feed.hold(2, 50, deadline=60)
    assert feed.publish_next(comment(4)) is False  # 3 is not here yet: the poller's
    assert not viewer.event.is_set() and feed.last_seq == 2
    assert feed.publish_next(comment(3)) is True
    assert viewer.event.is_set() and seqs(viewer.page) == [3]
    assert releases.kinds == [{"woken": 1}]
    assert feed.publish_next(comment(3)) is True  # already here: visible, nothing new
    # The poller, asked from 2 before the writer published, skips 3: once each.
    late = feed.hold(3, 50, deadline=60)
    assert feed.publish([comment(3), comment(4)]) == 1
    assert seqs(late.page) == [4]
    assert [c.seq for c in feed._window] == [1, 2, 3, 4]
    assert feed.publish([comment(3), comment(4)]) == 0


def test_publish_own_wakes_viewers_without_the_poller():
    store = FakeStore()
    hub = hub_for(store)
    cursor = hub.read(query()).cursor
    answers = []
    reader = threading.Thread(target=lambda: answers.append(hub.read(query(since=cursor))))
    reader.start()
    deadline = time.monotonic() + 5
    while hub.status()["held"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    calls = store.calls["changes_since"]
    mine = store.add("mine")
    assert hub.publish_own(CONTENT, mine) is True  # at once: no poller tick
    reader.join(2)
    assert seqs(answers[0]) == [mine.seq] and answers[0].kind is Kind.WOKEN
    assert store.calls["changes_since"] == calls  # no query for it
    skipped = store.add("another process's")
    assert hub.publish_own(CONTENT, store.add("after a gap")) is False  # timed out
    (poller,) = hub.pollers()
    poller.tick()
    assert hub.read(query(since=mine.seq, wait=0)).changes[0] == skipped
    hub.close()


def test_publish_of_nothing_wakes_nobody():
    feed, releases = make_feed([comment(1)])
    waiter = feed.hold(1, 50, deadline=60)
    assert feed.publish([]) == 0
    assert not waiter.event.is_set() and releases.calls == []


def test_hold_refuses_a_cursor_a_change_has_already_passed():
    feed, _ = make_feed([comment(1), comment(2)])
    assert feed.hold(1, 50, deadline=60) is None
    assert feed.held == 0


def test_expire_answers_timed_out_and_disconnected_waiters_at_their_cursor():
    feed, releases = make_feed([comment(1), comment(2)])
    gone = {"flag": False}
    late_1 = feed.hold(2, 50, deadline=10)
    late_2 = feed.hold(2, 50, deadline=12)
    vanished = feed.hold(2, 50, deadline=100, disconnected=lambda: gone["flag"])
    patient = feed.hold(2, 50, deadline=100, disconnected=lambda: False)

    assert feed.expire(now=9) == 0
    assert releases.calls == []

    gone["flag"] = True
    assert feed.expire(now=12) == 3
    for waiter in (late_1, late_2, vanished):
        assert waiter.event.is_set()
        assert page(waiter.page) == {"content_id": CONTENT, "comments": [], "cursor": 2,
                                     "poll_after_ms": 0, "reset": False}
    assert late_1.page is late_2.page is vanished.page
    assert releases.calls == [3] and releases.kinds == [{"timeout": 3}]
    assert not patient.event.is_set() and feed.held == 1


def test_cancel_takes_a_waiter_back_once_and_not_after_a_waker_took_it():
    feed, releases = make_feed([comment(1)])
    first = feed.hold(1, 50, deadline=60)
    second = feed.hold(1, 50, deadline=60)
    assert feed.cancel(first) is True
    assert feed.cancel(first) is False
    assert feed.held == 1

    feed.publish([comment(2)])
    assert second.event.is_set()
    assert feed.cancel(second) is False  # its slot was released by the waker
    assert releases.calls == [1]
    assert not first.event.is_set()


def test_close_answers_every_waiter():
    feed, releases = make_feed([comment(1)])
    waiters = [feed.hold(1, 50, deadline=60) for _ in range(3)]
    feed.close()
    assert all(w.event.is_set() and page(w.page)["cursor"] == 1 for w in waiters)
    assert releases.calls == [3] and feed.held == 0


def test_page_after_and_latest_page_come_from_memory_within_the_window():
    # Window of 5 loaded from a content at seq 8: seqs 4..8 in memory.
    feed, _ = make_feed([comment(s) for s in range(4, 9)], floor=3, window_size=5)
    assert seqs(feed.page_after(3, 50)) == [4, 5, 6, 7, 8]
    assert page(feed.page_after(3, 50))["cursor"] == 8
    part = feed.page_after(5, 2)
    assert seqs(part) == [6, 7] and page(part)["cursor"] == 7
    assert page(feed.page_after(8, 50)) == {"content_id": CONTENT, "comments": [],
                                            "cursor": 8, "poll_after_ms": 0, "reset": False}
    # Same question, same answer object until the next change.
    assert feed.page_after(5, 2) is part

    latest = feed.latest_page(3)
    assert seqs(latest) == [6, 7, 8] and page(latest)["cursor"] == 8
    assert feed._store.reads() == 0
    assert part.kind is Kind.CATCH_UP and latest.kind is Kind.LATEST


def test_reads_below_the_window_ask_the_store_once_and_keep_the_page():
    store = FakeStore()
    for n in range(1, 9):
        store.add(f"c{n}")
    changes = store.changes_since(CONTENT, 3, 50)
    store.calls["changes_since"] = 0
    feed, _ = make_feed(changes, floor=3, window_size=5, store=store)

    old = feed.page_after(1, 3)
    assert seqs(old) == [2, 3, 4] and old.cursor == 4 and old.kind is Kind.CATCH_UP
    assert feed.page_after(1, 3) is old
    assert store.calls["changes_since"] == 1

    latest = feed.latest_page(6)
    assert seqs(latest) == [3, 4, 5, 6, 7, 8] and latest.cursor == 8
    assert feed.latest_page(6) is latest
    assert store.calls["latest"] == 1


def test_latest_page_of_a_feed_that_starts_at_zero_is_complete():
    feed, _ = make_feed([comment(1), comment(2)], floor=0)
    assert seqs(feed.latest_page(50)) == [1, 2]
    empty, _ = make_feed([], floor=0)
    assert page(empty.latest_page(50)) == {"content_id": CONTENT, "comments": [], "cursor": 0,
                                           "poll_after_ms": 0, "reset": False}


def test_tombstone_replaces_the_comment_in_the_window():
    feed, _ = make_feed([comment(1), comment(2, "secret"), comment(3)])
    before = feed.page_after(0, 50)
    latest_before = feed.latest_page(50)
    assert b"secret" in before.body and b"secret" in latest_before.body

    feed.publish([comment(4, id=2, deleted=True)])

    after = feed.page_after(0, 50)
    assert b"secret" not in after.body
    assert [(c["id"], c["seq"], c["deleted"]) for c in page(after)["comments"]] == [
        (1, 1, False), (3, 3, False), (2, 4, True)
    ]
    latest = feed.latest_page(50)
    assert b"secret" not in latest.body
    assert [c["id"] for c in page(latest)["comments"]] == [1, 3]
    assert page(latest)["cursor"] == 4
    # Catching up from just before the deletion sees only the tombstone.
    assert [(c["id"], c["body"]) for c in page(feed.page_after(3, 50))["comments"]] == [(2, None)]


def test_window_keeps_the_latest_changes_and_moves_its_floor():
    store = FakeStore()
    feed, _ = make_feed([], window_size=3, store=store)
    for seq in range(1, 6):
        feed.publish([store.add(f"c{seq}")])
    assert feed.last_seq == 5
    assert seqs(feed.page_after(2, 50)) == [3, 4, 5]
    assert seqs(feed.latest_page(3)) == [3, 4, 5]
    assert store.reads() == 0
    assert seqs(feed.page_after(1, 50)) == [2, 3, 4, 5]
    assert seqs(feed.latest_page(4)) == [2, 3, 4, 5]
    assert store.calls["changes_since"] == store.calls["latest"] == 1

    # One publish larger than the window keeps only its tail.
    feed.publish([store.add(f"c{s}") for s in range(6, 11)])
    assert seqs(feed.page_after(7, 50)) == [8, 9, 10]
    assert store.calls["changes_since"] == 1
    assert seqs(feed.page_after(6, 50)) == [7, 8, 9, 10]
    assert store.calls["changes_since"] == 2


def test_waiter_whose_cursor_fell_out_of_the_window_is_told_to_read_the_store():
    feed, releases = make_feed([comment(1)], window_size=2)
    waiter = feed.hold(1, 50, deadline=60)
    feed.publish([comment(2), comment(3), comment(4)])
    assert waiter.event.is_set()
    assert waiter.page is None  # the woken request thread reads the store
    assert releases.calls == [1]


# -- Poller ----------------------------------------------------------------


def loaded(store, window_size=100):
    changes = store.changes_since(CONTENT, 0, window_size)
    return make_feed(changes, floor=0, window_size=window_size, store=store)


def test_poll_once_publishes_what_the_store_has_and_wakes_viewers():
    store = FakeStore()
    store.add("one")
    feed, releases = loaded(store)
    waiter = feed.hold(1, 50, deadline=60)
    poller = Poller(feed, store, interval=0.5, clock=FakeClock())

    poller.poll_once()
    assert not waiter.event.is_set()  # nothing new

    store.add("two")
    poller.poll_once()
    assert waiter.event.is_set() and seqs(waiter.page) == [2]
    assert feed.last_seq == 2 and releases.calls == [1]


def test_poll_once_fetches_a_backlog_in_batches():
    store = FakeStore()
    feed, _ = loaded(store)
    for n in range(7):
        store.add(f"c{n}")
    poller = Poller(feed, store, interval=0.5, clock=FakeClock(), batch=3)
    before = store.calls["changes_since"]
    poller.poll_once()
    assert feed.last_seq == 7
    assert store.calls["changes_since"] - before == 3  # 3 + 3 + 1


def store_call_times(poller, store, clock, seconds, step=0.01):
    """Tick every ``step`` of fake time; when did the poller ask the store?"""
    times = []
    start = clock.now
    for i in range(round(seconds / step)):
        clock.now = start + i * step  # no drift from adding up steps
        calls = store.calls["changes_since"]
        poller.tick()
        if store.calls["changes_since"] != calls:
            times.append(clock.now)
    clock.now = start + seconds
    return times


def gaps(times):
    return [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]


def test_tick_backs_off_with_growing_delays_and_keeps_the_cursor():
    store = FakeStore()
    store.add("one")
    feed, _ = loaded(store)
    clock = FakeClock()
    poller = Poller(feed, store, interval=0.5, clock=clock, rng=lambda: 1.0)

    store.fail = db_error()
    store.add("written while we cannot read")
    times = store_call_times(poller, store, clock, 21.4)
    # Each retry waits twice as long as the last, up to 5 s (no jitter
    # with rng() == 1; ticks every 10 ms, hence the 0.01 tolerance).
    expected = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert len(times) > len(expected)
    for gap, delay in zip(gaps(times), expected, strict=False):
        assert delay <= gap <= delay + 0.011
    assert feed.last_seq == 1  # never advanced on an error
    assert poller.failures == len(times)

    store.fail = None
    clock.advance(5)
    poller.tick()
    assert feed.last_seq == 2 and poller.failures == 0

    # A new outage starts again from the smallest delay.
    store.fail = db_error()
    restart = gaps(store_call_times(poller, store, clock, 0.35))
    assert len(restart) == 2 and restart[0] <= 0.11 and restart[1] <= 0.21


def test_a_write_ends_the_backoff_at_once():
    """A write that commits proves the database is back: the poller polls on
    its next tick instead of sleeping out a pause of up to 5 s."""
    store = FakeStore()
    store.add("one")
    feed, _ = loaded(store)
    clock = FakeClock()
    poller = Poller(feed, store, interval=0.5, clock=clock, rng=lambda: 1.0)
    waiter = feed.hold(1, 50, deadline=clock.now + 60)
    store.fail = db_error()
    store_call_times(poller, store, clock, 10)  # deep in backoff: 5 s pauses
    calls = store.calls["changes_since"]
    poller.tick()
    assert store.calls["changes_since"] == calls  # still pausing

    store.fail = None
    store.add("the database is back")
    poller.wake()
    poller.tick()
    assert waiter.event.is_set() and seqs(waiter.page) == [2]
    assert poller.failures == 0


def test_backoff_jitter_stays_between_50_ms_and_5_s():
    store = FakeStore()
    feed, _ = loaded(store)
    clock = FakeClock()
    poller = Poller(feed, store, interval=0.5, clock=clock, rng=random.Random(3).random)
    store.fail = db_error()
    delays = gaps(store_call_times(poller, store, clock, 150))
    assert len(delays) > 35
    assert all(0.05 <= d <= 5.01 for d in delays)
    assert delays[0] <= 0.11
    assert min(delays[10:]) >= 2.5  # jitter halves at most; the cap is 5 s
    assert max(delays) > 4.5
    assert len(set(delays[10:])) > 15  # processes do not retry in step


def test_holds_time_out_from_memory_while_the_store_is_down():
    store = FakeStore()
    store.add("one")
    feed, releases = loaded(store)
    clock = FakeClock()
    poller = Poller(feed, store, interval=0.5, clock=clock)
    waiter = feed.hold(1, 50, deadline=clock.now + 2)

    store.fail = db_error()
    store.add("unseen")
    for _ in range(5):
        clock.advance(0.5)
        poller.tick()
    assert waiter.event.is_set()
    assert page(waiter.page)["comments"] == [] and page(waiter.page)["cursor"] == 1
    assert releases.calls == [1]

    # The viewer comes back with the same cursor; once the store answers
    # again it gets the change written during the outage.
    again = feed.hold(1, 50, deadline=clock.now + 20)
    store.fail = None
    clock.advance(6)
    poller.tick()
    assert again.event.is_set() and seqs(again.page) == [2]


def test_poller_thread_survives_errors_and_answers_viewers_when_stopped():
    store = FakeStore()
    feed, _ = loaded(store)
    poller = Poller(feed, store, interval=0.01, backoff_max=0.02)
    store.fail = RuntimeError("not even a database error")
    poller.start()
    try:
        deadline = time.monotonic() + 2
        while store.calls["changes_since"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        store.fail = db_error()
        calls = store.calls["changes_since"]
        while store.calls["changes_since"] < calls + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert poller.failures > 0
        waiter = feed.hold(0, 50, deadline=time.monotonic() + 60)
        store.fail = None
        store.add("after the outage")
        assert waiter.event.wait(2), "the poller thread died"
        assert seqs(waiter.page) == [1]

        last = feed.hold(1, 50, deadline=time.monotonic() + 60)
    finally:
        poller.stop()
    assert poller.join(2)
    assert last.event.is_set() and page(last.page)["cursor"] == 1


# -- FeedHub ---------------------------------------------------------------


def query(since=None, wait=20, limit=50, content_id=CONTENT):
    return FeedQuery(content_id, since=since, limit=limit, wait=wait)


def hub_for(store, clock=None, start_threads=False, **settings):
    values = {"poll_interval": 0.5, "max_wait": 5, "default_wait": 5, "feed_ttl": 10}
    values.update(settings)
    hub = FeedHub(store, make_settings(**values), clock=clock or FakeClock(),
                  start_threads=start_threads)
    hub.start()
    return hub


def test_feed_nobody_asks_for_expires_and_is_loaded_again():
    store = FakeStore()
    store.add("one")
    clock = FakeClock()
    hub = hub_for(store, clock, feed_ttl=10)
    feed = hub.feed(CONTENT)
    clock.advance(8)
    assert hub.feed(CONTENT) is feed  # asking renews its time to live
    clock.advance(8)
    hub.expire_feeds()
    assert [p.feed for p in hub.pollers()] == [feed]

    clock.advance(3)
    hub.expire_feeds()
    assert hub.pollers() == []
    assert hub.status()["feeds"] == 0
    store.add("two")
    again = hub.feed(CONTENT)
    assert again is not feed and again.last_seq == 2


def test_the_sweeper_stops_the_poller_of_an_expired_feed_and_no_other():
    store = FakeStore()
    clock = FakeClock()
    hub = hub_for(store, clock, start_threads=True, poll_interval=0.01, feed_ttl=10)
    try:
        hub.feed(CONTENT)
        (idle,) = hub.pollers()
        clock.advance(6)
        hub.feed(CONTENT + 1)
        watched = next(p for p in hub.pollers() if p is not idle)
        assert not idle.join(0.05) and not watched.join(0)  # both running
        clock.advance(5)  # only the first is past its time to live
        assert idle.join(3), "the poller of an expired feed kept running"
        assert not watched.join(0.2), "an expiry stopped another content's poller"
        assert hub.pollers() == [watched]
    finally:
        hub.close()


def test_a_closed_hub_refuses_reads_and_starts_no_poller():
    store = FakeStore()
    store.add("one")
    hub = hub_for(store)
    hub.read(query())
    hub.close()
    assert hub.closed
    for q in (query(), query(since=1, wait=5), query(content_id=CONTENT + 1)):
        try:
            hub.read(q)
        except Draining:
            pass
        else:
            raise AssertionError(f"a closed hub answered {q}")
    assert hub.pollers() == [] and store.calls["current_seq"] == 1


def test_read_says_what_kind_of_answer_it_gave():
    store = FakeStore()
    for n in range(1, 6):
        store.add(f"c{n}")
    clock = FakeClock()
    hub = hub_for(store, clock, reset_after=3, hold_budget=1)
    latest = hub.read(query())
    assert (latest.kind, latest.cursor, seqs(latest)) == (Kind.LATEST, 5, [1, 2, 3, 4, 5])
    catch_up = hub.read(query(since=3))
    assert (catch_up.kind, catch_up.cursor, seqs(catch_up)) == (Kind.CATCH_UP, 5, [4, 5])
    assert [c.seq for c in catch_up.changes] == [4, 5]
    reset = hub.read(query(since=1))
    assert (reset.kind, page(reset)["reset"]) == (Kind.RESET, True)
    empty = hub.read(query(since=5, wait=0))
    assert (empty.kind, empty.cursor, empty.changes) == (Kind.EMPTY, 5, ())

    (poller,) = hub.pollers()
    answers = []
    reader = threading.Thread(target=lambda: answers.append(hub.read(query(since=5, wait=2))))
    reader.start()
    deadline = time.monotonic() + 2
    while hub.budget.held < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    shed = hub.read(query(since=5, wait=2))  # the budget of one is spent
    assert (shed.kind, shed.poll_after_ms, shed.cursor) == (Kind.SHED, 2000, 5)
    clock.advance(2)
    poller.tick()
    reader.join(2)
    assert answers[0].kind is Kind.TIMEOUT and answers[0].cursor == 5

    reader = threading.Thread(target=lambda: answers.append(hub.read(query(since=5, wait=2))))
    reader.start()
    while hub.budget.held < 1 and time.monotonic() < deadline + 2:
        time.sleep(0.005)
    store.add("c6")
    poller.tick()
    reader.join(2)
    assert (answers[1].kind, answers[1].cursor, seqs(answers[1])) == (Kind.WOKEN, 6, [6])
    # The woken answer is the catch-up page's bytes, not a copy.
    assert answers[1].body is hub.read(query(since=5)).body
    assert hub.status()["answers"] == {"latest": 1, "catch_up": 2, "reset": 1, "empty": 1,
                                       "shed": 1, "timeout": 1, "woken": 1}


def test_wake_returns_at_once_and_wait_visible_waits_for_the_poller():
    store = FakeStore()
    hub = hub_for(store, write_visible_timeout=0.2)
    hub.read(query())
    (poller,) = hub.pollers()
    comment = store.add("mine")
    started = time.monotonic()
    hub.wake(CONTENT)
    assert time.monotonic() - started < 0.05
    assert hub.wait_visible(CONTENT, comment.seq) is False  # nobody polled: timed out
    poller.tick()
    assert hub.wait_visible(CONTENT, comment.seq) is True
    assert hub.wait_visible(CONTENT + 1, 99) is True  # not watched here: nothing to wait for


def test_close_stops_every_poller_and_answers_held_viewers():
    store = FakeStore()
    hub = hub_for(store, start_threads=True, poll_interval=0.05)
    feeds = [hub.feed(content) for content in (1, 2, 3)]
    pollers = hub.pollers()
    waiter = feeds[0].hold(0, 50, deadline=time.monotonic() + 60)
    hub.close(timeout=2)
    assert all(p.join(0) for p in pollers), "close() left pollers running"
    assert waiter.event.is_set() and page(waiter.page)["cursor"] == 0


def test_held_read_is_answered_by_the_poller_and_frees_its_slot():
    store = FakeStore()
    store.add("one")
    hub = hub_for(store)
    hub.read(query())  # loads the feed
    (poller,) = hub.pollers()
    answers = []
    reader = threading.Thread(target=lambda: answers.append(hub.read(query(since=1, wait=5))))
    reader.start()
    deadline = time.monotonic() + 2
    while hub.budget.held < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert hub.budget.held == 1 and not answers

    store.add("two")
    poller.tick()
    reader.join(2)
    assert seqs(answers[0]) == [2]
    assert hub.budget.held == 0


def test_held_read_times_out_from_memory():
    store = FakeStore()
    store.add("one")
    clock = FakeClock()
    hub = hub_for(store, clock)
    hub.read(query())
    (poller,) = hub.pollers()
    answers = []
    reader = threading.Thread(target=lambda: answers.append(hub.read(query(since=1, wait=2))))
    reader.start()
    deadline = time.monotonic() + 2
    while hub.budget.held < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    store.calls["current_seq"] = store.calls["latest"] = 0
    clock.advance(2)
    poller.tick()
    reader.join(2)
    assert page(answers[0]) == {"content_id": CONTENT, "comments": [], "cursor": 1,
                                "poll_after_ms": 0, "reset": False}
    assert hub.budget.held == 0
    assert store.calls["current_seq"] == store.calls["latest"] == 0


def test_exhausted_budget_sheds_with_poll_after_ms():
    store = FakeStore()
    store.add("one")
    hub = hub_for(store, hold_budget=2, shed_poll_after_ms=1500)
    hub.read(query())
    assert hub.budget.try_acquire() and hub.budget.try_acquire()

    started = time.monotonic()
    shed = page(hub.read(query(since=1, wait=5)))
    assert time.monotonic() - started < 0.5
    assert shed == {"content_id": CONTENT, "comments": [], "cursor": 1,
                    "poll_after_ms": 1500, "reset": False}
    assert hub.budget.held == 2

    # A short poll is never held, so never shed either.
    assert page(hub.read(query(since=1, wait=0)))["poll_after_ms"] == 0
    # Once a slot frees, the budget is usable again.
    hub.budget.release()
    assert hub.budget.try_acquire()


def test_wait_zero_never_holds():
    store = FakeStore()
    store.add("one")
    hub = hub_for(store)
    feed = hub.feed(CONTENT)
    started = time.monotonic()
    answer = page(hub.read(query(since=1, wait=0)))
    assert time.monotonic() - started < 0.5
    assert answer["comments"] == [] and answer["cursor"] == 1
    assert feed.held == 0 and hub.budget.held == 0


def test_client_too_far_behind_is_reset_to_the_latest_page():
    store = FakeStore()
    for n in range(1, 7):
        store.add(f"c{n}")
    hub = hub_for(store, reset_after=3)

    behind = page(hub.read(query(since=2, limit=2)))
    assert behind["reset"] is True
    assert behind["cursor"] == 6
    assert [c["seq"] for c in behind["comments"]] == [5, 6]

    close = page(hub.read(query(since=3)))
    assert close["reset"] is False
    assert [c["seq"] for c in close["comments"]] == [4, 5, 6] and close["cursor"] == 6


def test_client_ahead_of_the_database_is_reset():
    store = FakeStore()
    for n in range(1, 4):
        store.add(f"c{n}")
    hub = hub_for(store)
    hub.feed(CONTENT)

    replaced = page(hub.read(query(since=50, wait=0)))
    assert replaced["reset"] is True and replaced["cursor"] == 3
    assert [c["seq"] for c in replaced["comments"]] == [1, 2, 3]

    # Ahead of this process but not of the database: another process
    # handed out that cursor; it is a normal, empty answer.
    store.add("c4")
    ahead = page(hub.read(query(since=4, wait=0)))
    assert ahead == {"content_id": CONTENT, "comments": [], "cursor": 4,
                     "poll_after_ms": 0, "reset": False}


def test_catch_up_older_than_the_window_reads_the_store_once():
    store = FakeStore()
    for n in range(1, 9):
        store.add(f"c{n}")
    hub = hub_for(store, feed_window=3)
    hub.feed(CONTENT)

    store.calls["changes_since"] = 0
    recent = page(hub.read(query(since=6)))
    assert [c["seq"] for c in recent["comments"]] == [7, 8]
    assert store.calls["changes_since"] == 0  # from memory

    old = page(hub.read(query(since=1, limit=4)))
    assert [c["seq"] for c in old["comments"]] == [2, 3, 4, 5] and old["cursor"] == 5
    assert store.calls["changes_since"] == 1
    reads = store.reads()
    assert page(hub.read(query(since=1, limit=4))) == old
    assert store.reads() == reads  # the same catch-up again: from memory


def test_store_page_read_before_a_deletion_is_not_kept():
    """A catch-up read from the store that a deletion overtakes must not be
    cached: the deleted body would be served from memory until the next change."""
    store = FakeStore()
    for n in range(1, 6):
        store.add(f"c{n}" if n != 2 else "regrettable")
    hub = hub_for(store, feed_window=2)
    hub.feed(CONTENT)
    (poller,) = hub.pollers()

    def moderator_deletes_while_we_read():
        store.delete(2)
        poller.poll_once()

    store.during_read = moderator_deletes_while_we_read
    first = hub.read(query(since=1))
    assert b"regrettable" in first.body  # read before the deletion committed: fair

    again = hub.read(query(since=1))
    assert b"regrettable" not in again.body
    assert [(c["id"], c["deleted"]) for c in page(again)["comments"]][-1] == (2, True)


def test_latest_page_read_before_a_deletion_is_not_kept():
    store = FakeStore()
    for n in range(1, 6):
        store.add(f"c{n}" if n != 4 else "regrettable")
    hub = hub_for(store, feed_window=2)
    feed = hub.feed(CONTENT)
    (poller,) = hub.pollers()
    real_latest = store.latest

    def latest_overtaken(content_id, limit):
        answer = real_latest(content_id, limit)
        store.delete(4)
        poller.poll_once()
        return answer

    store.latest = latest_overtaken
    assert b"regrettable" in hub.read(query(limit=5)).body
    store.latest = real_latest
    assert feed.last_seq == 6
    again = hub.read(query(limit=5))
    assert b"regrettable" not in again.body
    assert page(again)["cursor"] == 6
