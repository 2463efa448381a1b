"""A content's poller: what it asks the store and when, its backoff, and its
thread's lifecycle; a fake store and a fake clock make every step explicit."""

from __future__ import annotations

import random
import time

from fakes import FakeClock, FakeStore, db_error, loaded, page, seqs

from service.live.poller import Poller


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
