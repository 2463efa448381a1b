"""The hub: which feed answers a read, from memory or the store, now or held;
the reset rule, the hold budget, draining, and the threads it owns."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import make_settings
from fakes import CONTENT, FakeClock, FakeStore, body, db_error, hub_for, page, query, seqs
from test_hold import waiting

from service.common.errors import StoreUnavailable
from service.config.settings import SettingsError
from service.live import hub as hub_module
from service.live.hub import Draining
from service.live.pages import Kind


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


class GatedStore(FakeStore):
    """A FakeStore whose current_seq (a feed load's first query) waits at a gate."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.loading = 0  # threads that reached the gate
        self._count = threading.Lock()

    def current_seq(self, content_id):
        with self._count:
            self.loading += 1
        self.gate.wait(10)
        return super().current_seq(content_id)


def wait_until(predicate, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what()}"
        time.sleep(0.005)


def _all_asking(store, waiting, count):
    """Wait until each of ``count`` viewers loads the feed (at the store's
    gate) or waits for another's load: every one has asked, none is answered."""
    wait_until(lambda: store.loading + len(waiting) == count,
               lambda: f"{count} viewers asking ({store.loading} loading, "
                       f"{len(waiting)} waiting for a load)")


def _first_viewers(hub, count, monkeypatch):
    """``count`` threads asking for CONTENT's feed at once; (threads, results,
    waiting): ``waiting`` has an entry per viewer waiting for another's load."""
    waiting = []
    result = hub_module._Loading.result

    def counted(loading):
        waiting.append(threading.current_thread())
        return result(loading)

    monkeypatch.setattr(hub_module._Loading, "result", counted)
    results = [None] * count

    def ask(i):
        try:
            results[i] = hub.feed(CONTENT)
        except StoreUnavailable as exc:  # a viewer's request answers it with 503
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, results, waiting


def test_viewers_arriving_together_share_one_feed_load(monkeypatch):
    store = GatedStore()
    store.add("one")
    hub = hub_for(store)
    threads, results, waiting = _first_viewers(hub, 50, monkeypatch)
    _all_asking(store, waiting, 50)  # one loads, 49 wait for it (not one load each)
    store.gate.set()
    for thread in threads:
        thread.join(5)
    assert store.calls["current_seq"] == 1 and store.calls["changes_since"] == 1
    assert len({id(feed) for feed in results}) == 1 and results[0].last_seq == 1
    assert len(hub.pollers()) == 1


def test_a_failed_feed_load_fails_its_waiters_and_the_next_viewer_loads_again(monkeypatch):
    store = GatedStore()
    store.add("one")
    store.fail = db_error()
    hub = hub_for(store)
    threads, results, waiting = _first_viewers(hub, 20, monkeypatch)
    _all_asking(store, waiting, 20)
    store.gate.set()
    for thread in threads:
        thread.join(5)
    assert store.calls["current_seq"] == 1, "the waiters loaded again on their own"
    assert all(result is store.fail for result in results)  # each answers 503
    assert hub.pollers() == []
    store.fail = None
    assert hub.feed(CONTENT).last_seq == 1


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
        assert idle.join(10), "the poller of an expired feed kept running"
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
    _held(hub)
    shed = hub.read(query(since=5, wait=2))  # the budget of one is spent
    assert (shed.kind, shed.poll_after_ms, shed.cursor) == (Kind.SHED, 2000, 5)
    clock.advance(2)
    poller.tick()
    reader.join(2)
    assert answers[0].kind is Kind.TIMEOUT and answers[0].cursor == 5

    reader = threading.Thread(target=lambda: answers.append(hub.read(query(since=5, wait=2))))
    reader.start()
    _held(hub)
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
    reads = store.reads()
    hub.wake(CONTENT)  # only tells the poller: the query is the poller's
    assert store.reads() == reads and poller._poked
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
    _held(hub)
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
    _held(hub)
    store.calls["current_seq"] = store.calls["latest"] = 0
    clock.advance(2)
    poller.tick()
    reader.join(2)
    assert page(answers[0]) == body([], 1)
    assert hub.budget.held == 0
    assert store.calls["current_seq"] == store.calls["latest"] == 0


def test_exhausted_budget_sheds_with_poll_after_ms():
    store = FakeStore()
    store.add("one")
    hub = hub_for(store, hold_budget=2, shed_poll_after_ms=1500)
    hub.read(query())
    assert hub.budget.try_acquire() and hub.budget.try_acquire()

    shed = page(hub.read(query(since=1, wait=5)))
    assert hub.feed(CONTENT).held == 0  # answered, not held
    assert shed == body([], 1, poll_after_ms=1500)
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
    answer = page(hub.read(query(since=1, wait=0)))
    assert hub.status()["answers"]["empty"] == 1 and hub.status()["answers"]["timeout"] == 0
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
    assert ahead == body([], 4)


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


def test_publish_own_needs_no_query_and_the_poller_answers_at_once():
    store = FakeStore()
    hub = hub_for(store)
    cursor = hub.read(query()).cursor
    answers = []
    reader = threading.Thread(target=lambda: answers.append(hub.read(query(since=cursor))))
    reader.start()
    _held(hub)
    calls = store.calls["changes_since"]
    mine = store.add("mine")
    assert hub.publish_own(CONTENT, mine) is True  # at once: visible to the writer
    (poller,) = hub.pollers()
    poller.feed.deliver_pending()  # what the poller's thread does when told to deliver
    reader.join(2)
    assert seqs(answers[0]) == [mine.seq] and answers[0].kind is Kind.WOKEN
    assert store.calls["changes_since"] == calls  # no query for it
    skipped = store.add("another process's")
    assert hub.publish_own(CONTENT, store.add("after a gap")) is False  # timed out
    poller.tick()
    assert hub.read(query(since=mine.seq, wait=0)).changes[0] == skipped
    hub.close()


def test_a_notify_for_a_change_the_feed_has_queries_nothing():
    store = FakeStore()
    hub = hub_for(store)
    hub.read(query())
    (poller,) = hub.pollers()
    poller.tick()  # its first pass, which queries anyway
    mine = store.add("mine")
    hub.publish_own(CONTENT, mine)
    hub.notified(CONTENT, mine.seq)  # this process's own NOTIFY
    assert not poller._poked
    hub.notified(CONTENT, mine.seq + 1)  # another process's, not here yet
    assert poller._poked
    assert hub.notify_wakes == 2
    hub.close()


class StuckPollerStore(FakeStore):
    """A FakeStore whose queries from a poller thread block until ``unstuck``
    is set (a poller stuck on a dead database connection); the request
    threads' reads (the feed's load) are answered as usual."""

    def __init__(self):
        super().__init__()
        self.stuck = threading.Event()
        self.unstuck = threading.Event()

    def changes_since(self, content_id, since, limit):
        if threading.current_thread().name.startswith("livecomments-poller"):
            self.stuck.set()
            self.unstuck.wait(30)
        return super().changes_since(content_id, since, limit)


def test_holds_that_answer_themselves_past_a_stuck_poller_free_their_slots():
    """A held viewer whose poller never answers it (stuck on the database)
    answers itself after its wait and the grace, and gives its hold slot
    back: with a budget of 2, round after round of such holds is never shed,
    and once the poller is back a hold is woken as usual."""
    store = StuckPollerStore()
    store.add("one")
    hub = hub_for(store, start_threads=True, hold_budget=2, poll_interval=0.05)
    try:
        hub.read(query())  # loads the feed; its poller's first query sticks
        assert store.stuck.wait(5), "the poller never queried"
        answers = []

        def read():
            answers.append(hub.read(query(since=1, wait=0.05)))

        for round_ in range(3):  # each round spends the whole budget
            readers = [threading.Thread(target=read) for _ in range(2)]
            for reader in readers:
                reader.start()
            for reader in readers:
                reader.join(10)
            assert not any(reader.is_alive() for reader in readers), "a hold never ended"
            kinds = [a.kind for a in answers[-2:]]
            assert kinds == [Kind.TIMEOUT, Kind.TIMEOUT], (round_, kinds)
            assert all(a.cursor == 1 and a.changes == () for a in answers[-2:])
            assert hub.budget.held == 0, f"round {round_}: {hub.budget.held} slots leaked"
        (poller,) = hub.pollers()
        assert poller.feed.held == 0  # each took its waiter back
        assert hub.status()["answers"]["timeout"] == 6
        assert hub.status()["answers"]["shed"] == 0

        # The poller comes back: a new hold is held (not shed) and woken.
        woken = []
        reader = threading.Thread(target=lambda: woken.append(hub.read(query(since=1, wait=10))))
        reader.start()
        _held(hub)
        store.add("two")
        store.unstuck.set()
        reader.join(10)
        assert woken and woken[0].kind is Kind.WOKEN and seqs(woken[0]) == [2], woken
        assert hub.budget.held == 0
    finally:
        store.unstuck.set()
        hub.close()


# -- the room --------------------------------------------------------------------

CLOSED_PAUSE = 300_000


def _held(hub, count=1):
    """Until ``count`` reads are held: their slots taken and waiting in their
    feeds (see :func:`test_hold.waiting`)."""
    deadline = time.monotonic() + 5
    while hub.budget.held < count or waiting(hub) < count:
        assert time.monotonic() < deadline, "the read was never held"
        time.sleep(0.005)


def test_every_kind_of_answer_carries_the_room():
    store = FakeStore()
    for n in range(1, 6):
        store.add(f"c{n}")
    store.set_room(slow_mode_seconds=30)  # seq 6
    slow = {"closed": False, "slow_mode_seconds": 30, "pinned": None}
    clock = FakeClock()
    hub = hub_for(store, clock, reset_after=3, hold_budget=1, shed_poll_after_ms=2000)
    answers = {"latest": hub.read(query()), "catch_up": hub.read(query(since=4)),
               "reset": hub.read(query(since=1)), "empty": hub.read(query(since=6, wait=0))}
    (poller,) = hub.pollers()
    held = []
    reader = threading.Thread(target=lambda: held.append(hub.read(query(since=6, wait=2))))
    reader.start()
    _held(hub)
    answers["shed"] = hub.read(query(since=6, wait=2))
    clock.advance(2)
    poller.tick()
    reader.join(2)
    answers["timeout"] = held.pop()
    reader = threading.Thread(target=lambda: held.append(hub.read(query(since=6, wait=2))))
    reader.start()
    _held(hub)
    store.add("c7")
    poller.tick()
    reader.join(2)
    answers["woken"] = held.pop()
    for kind, answer in answers.items():
        assert answer.kind.value == kind
        assert page(answer)["room"] == slow, kind
        assert "events" in page(answer), kind
    assert page(answers["reset"])["reset"] is True
    assert page(answers["catch_up"])["events"][0]["type"] == "room"
    assert page(answers["shed"])["poll_after_ms"] == 2000


def test_a_closed_content_asks_the_long_pause_of_every_answer():
    store = FakeStore()
    store.add("one")
    store.set_room(closed=True)  # seq 2
    hub = hub_for(store, hold_budget=2, closed_poll_after_ms=CLOSED_PAUSE,
                  shed_poll_after_ms=1500)
    assert hub.read(query()).poll_after_ms == CLOSED_PAUSE
    assert hub.read(query(since=0)).poll_after_ms == CLOSED_PAUSE
    empty = hub.read(query(since=2, wait=0))
    assert (empty.kind, empty.poll_after_ms) == (Kind.EMPTY, CLOSED_PAUSE)
    assert hub.read(query(since=2, wait=0)).body is empty.body  # encoded once
    assert hub.budget.try_acquire() and hub.budget.try_acquire()
    shed = hub.read(query(since=2, wait=5))
    assert (shed.kind, shed.poll_after_ms) == (Kind.SHED, CLOSED_PAUSE)
    assert page(shed)["room"]["closed"] is True


def test_closing_wakes_the_held_viewers_and_a_reopen_wakes_those_held_after():
    store = FakeStore()
    store.add("one")
    hub = hub_for(store, closed_poll_after_ms=CLOSED_PAUSE)
    hub.read(query())
    (poller,) = hub.pollers()
    answers = []

    def read():
        answers.append(hub.read(query(since=hub.feed(CONTENT).last_seq, wait=5)))

    readers = [threading.Thread(target=read) for _ in range(5)]
    for reader in readers:
        reader.start()
    _held(hub, 5)
    closing = store.set_room(closed=True)
    poller.tick()
    for reader in readers:
        reader.join(2)
    assert len(answers) == 5 and len({a.body for a in answers}) == 1
    assert len({id(a.body) for a in answers}) == 1  # one encoding for all
    first = page(answers[0])
    assert answers[0].kind is Kind.WOKEN and first["cursor"] == closing.seq
    assert first["room"]["closed"] is True and first["poll_after_ms"] == CLOSED_PAUSE
    assert first["events"] == [closing.to_json()]

    # Held at the newest change of a closed content: still held...
    answers.clear()
    reader = threading.Thread(target=read)
    reader.start()
    _held(hub)
    assert hub.feed(CONTENT).held == 1
    # ... and woken by the reopening, which asks no pause.
    reopening = store.set_room(closed=False)
    poller.tick()
    reader.join(2)
    reopened = page(answers[0])
    assert answers[0].kind is Kind.WOKEN and reopened["cursor"] == reopening.seq
    assert reopened["room"]["closed"] is False and reopened["poll_after_ms"] == 0
    assert hub.budget.held == 0


def test_a_reset_page_carries_the_room():
    store = FakeStore()
    for n in range(1, 7):
        store.add(f"c{n}")
    store.set_room(closed=True, slow_mode_seconds=5)
    hub = hub_for(store, reset_after=3, closed_poll_after_ms=CLOSED_PAUSE)
    reset = hub.read(query(since=1, limit=2))
    assert reset.kind is Kind.RESET
    assert page(reset) == body([store.rows[5].to_json(), store.rows[6].to_json()], 7,
                               room={"closed": True, "slow_mode_seconds": 5, "pinned": None},
                               poll_after_ms=CLOSED_PAUSE, reset=True)


def test_the_closed_pause_is_a_setting_of_at_least_a_millisecond():
    assert make_settings().closed_poll_after_ms == CLOSED_PAUSE
    assert make_settings(closed_poll_after_ms=1).closed_poll_after_ms == 1
    with pytest.raises(SettingsError, match="closed_poll_after_ms"):
        make_settings(closed_poll_after_ms=0)
