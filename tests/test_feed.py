"""One content's feed, without HTTP or threads: its window of changes, its
held viewers, its page cache and the wake path."""

from __future__ import annotations

from fakes import (
    CONTENT,
    FakeStore,
    Releases,
    ban_event,
    body,
    comment,
    event_seqs,
    make_feed,
    open_room,
    page,
    room_event,
    seqs,
    unban_event,
)

from service.live.feed import Feed
from service.live.pages import Kind, answer_kind


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
    assert page(a.page) == body(page(a.page)["comments"], 5)
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
    assert feed.last_seq == 3 and not viewer.event.is_set()  # the poller answers
    assert feed.deliver_pending() == 1 and feed.deliver_pending() == 0
    assert viewer.event.is_set() and seqs(viewer.page) == [3]
    assert releases.kinds == [{"woken": 1}]
    assert feed.publish_next(comment(3)) is True  # already here: visible, nothing new
    # The poller, asked from 2 before the writer published, skips 3: once each.
    late = feed.hold(3, 50, deadline=60)
    assert feed.publish([comment(3), comment(4)]) == 1
    assert seqs(late.page) == [4]
    assert [c.seq for c in feed._window] == [1, 2, 3, 4]
    assert feed.publish([comment(3), comment(4)]) == 0


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
        assert page(waiter.page) == body([], 2)
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
    assert page(feed.page_after(8, 50)) == body([], 8)
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
    assert page(empty.latest_page(50)) == body([], 0)


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


def test_one_rule_decides_every_kind_of_answer():
    """answer_kind, the hub's and the feed's one rule, in order: no cursor,
    the reset rule, changes (ending a hold or not), a hold ending empty,
    wait=0, no slot; else hold. Each question is asked only in its turn."""

    def never():
        raise AssertionError("asked out of turn")

    assert answer_kind(latest=True, must_reset=never, take_slot=never) is Kind.LATEST
    assert answer_kind(must_reset=lambda: True, changes=True, take_slot=never) is Kind.RESET
    assert answer_kind(must_reset=lambda: False, changes=True, take_slot=never) is Kind.CATCH_UP
    assert answer_kind(changes=True, held=True) is Kind.WOKEN
    assert answer_kind(held=True, take_slot=never) is Kind.TIMEOUT
    assert answer_kind(wait=0, take_slot=never) is Kind.EMPTY
    assert answer_kind(wait=5, take_slot=lambda: False) is Kind.SHED
    taken = []
    assert answer_kind(wait=5, take_slot=lambda: not taken.append(1)) is None  # held
    assert taken == [1]


# -- the room and moderation events ----------------------------------------------

CLOSED_PAUSE = 300_000


def test_the_room_is_loaded_with_the_feed_and_every_page_carries_it():
    store = FakeStore()
    pinned = store.add("pin me")
    store.add("two")
    store.set_room(slow_mode_seconds=10, pinned=pinned)  # seq 3
    store.add("four")
    feed = Feed.load(store, CONTENT, window_size=100, settle=Releases())
    room = {"closed": False, "slow_mode_seconds": 10, "pinned": pinned.to_json()}
    assert feed.room == room and store.calls["room"] == 1

    catch_up = page(feed.page_after(0, 50))
    assert catch_up == body([c.to_json() for c in store.rows.values()], 4, room=room,
                            events=[store.events[0].to_json()])
    assert event_seqs(feed.page_after(0, 50)) == [(3, "room")]
    latest = feed.latest_page(50)
    assert seqs(latest) == [1, 2, 4] and page(latest)["events"] == []  # comments only
    assert page(latest)["room"] == room
    assert page(feed.page_after(4, 50)) == body([], 4, room=room)
    assert page(feed.page(Kind.SHED, 4, poll_after_ms=2000)) == body([], 4, room=room,
                                                                  poll_after_ms=2000)

    waiter = feed.hold(4, 50, deadline=10)
    feed.expire(now=10)
    assert page(waiter.page) == body([], 4, room=room)
    waiter = feed.hold(4, 50, deadline=60)
    feed.publish([store.add("five")])
    assert page(waiter.page)["room"] == room and seqs(waiter.page) == [5]


def test_a_room_event_in_the_loaded_window_is_newer_than_the_room_read():
    feed, _ = make_feed([comment(1), room_event(2, slow_mode_seconds=30)], room=open_room())
    assert feed.room["slow_mode_seconds"] == 30


def test_a_room_event_replaces_the_room_and_only_the_newest_stays_in_the_window():
    feed, releases = make_feed([comment(1), comment(2)])
    viewers = [feed.hold(2, 50, deadline=60) for _ in range(50)]
    other_limit = feed.hold(2, 1, deadline=60)

    feed.publish([room_event(3, slow_mode_seconds=5), ban_event(4, author_id=1),
                  comment(5)])
    slow = {"closed": False, "slow_mode_seconds": 5, "pinned": None}
    assert feed.room == slow
    # Fifty viewers at one cursor: one page, one body, the same bytes.
    assert len({id(v.page) for v in viewers}) == 1
    assert all(v.page.body is viewers[0].page.body for v in viewers)
    woken = page(viewers[0].page)
    assert [c["seq"] for c in woken["comments"]] == [5]
    assert [(e["seq"], e["type"]) for e in woken["events"]] == [(3, "room"), (4, "ban")]
    assert woken["events"][1]["author_id"] == 1 and woken["room"] == slow
    assert woken["cursor"] == 5 and woken["poll_after_ms"] == 0
    # Limit 1: the room event alone, but the room as the feed knows it.
    assert event_seqs(other_limit.page) == [(3, "room")] and page(other_limit.page)["cursor"] == 3
    assert releases.kinds == [{"woken": 51}]

    feed.publish([room_event(6, slow_mode_seconds=0), unban_event(7, author_id=1)])
    assert feed.room == open_room()
    assert [(c.seq, c.is_comment) for c in feed._window] == [
        (1, True), (2, True), (4, False), (5, True), (6, False), (7, False)]
    assert event_seqs(feed.page_after(0, 50)) == [(4, "ban"), (6, "room"), (7, "unban")]
    # A tombstone replaces its comment, never an event.
    feed.publish([comment(8, id=5, deleted=True)])
    assert [(c.seq, c.is_comment) for c in feed._window] == [
        (1, True), (2, True), (4, False), (6, False), (7, False), (8, True)]
    assert seqs(feed.latest_page(50)) == [1, 2]


def test_every_page_of_a_closed_content_asks_the_long_pause():
    closed = {"closed": True, "slow_mode_seconds": 0, "pinned": None}
    feed, releases = make_feed([comment(1), room_event(2, closed=True)],
                               closed_poll_after_ms=CLOSED_PAUSE, idle_poll_after_ms=1000)
    assert feed.closed and feed.room == closed
    assert page(feed.latest_page(50)) == body([comment(1).to_json()], 2, room=closed,
                                              poll_after_ms=CLOSED_PAUSE)
    assert page(feed.page_after(0, 50))["poll_after_ms"] == CLOSED_PAUSE
    assert page(feed.page_after(2, 50)) == body([], 2, room=closed, poll_after_ms=CLOSED_PAUSE)
    assert feed.page(Kind.SHED, 2, poll_after_ms=2000).poll_after_ms == CLOSED_PAUSE
    # A hold on a closed content is still a hold: it times out with the
    # long pause (not re-encoded: the empty page asked it already)...
    timed_out = feed.hold(2, 50, deadline=10)
    assert timed_out is not None and feed.held == 1
    empty = feed.page_after(2, 50)
    feed.expire(now=10)
    assert timed_out.page.body is empty.body and timed_out.page.kind is Kind.TIMEOUT
    # ... or a moderator reopening the content wakes it, asking no pause.
    held = [feed.hold(2, 50, deadline=60) for _ in range(3)]
    feed.publish([room_event(3)])
    assert not feed.closed
    assert all(w.page is held[0].page for w in held)
    assert page(held[0].page) == body([], 3, room=open_room(), events=[room_event(3).to_json()])
    assert releases.kinds == [{"timeout": 1}, {"woken": 3}]


def test_the_change_closing_a_content_wakes_its_viewers_at_once_with_the_long_pause():
    feed, releases = make_feed([comment(1)], closed_poll_after_ms=CLOSED_PAUSE)
    held = [feed.hold(1, 50, deadline=60) for _ in range(20)]
    assert feed.publish_next(room_event(2, closed=True)) is True  # a moderator of this process
    assert feed.deliver_pending() == 20
    closed = {"closed": True, "slow_mode_seconds": 0, "pinned": None}
    assert all(w.page is held[0].page for w in held)
    assert page(held[0].page) == body([], 2, room=closed, poll_after_ms=CLOSED_PAUSE,
                                      events=[room_event(2, closed=True).to_json()])
    assert held[0].page.kind is Kind.WOKEN
    # Viewers arriving at the new cursor are held, not answered.
    assert feed.hold(2, 50, deadline=60) is not None


def test_a_page_read_from_the_store_carries_the_room_the_feed_knew():
    store = FakeStore()
    for n in range(1, 9):
        store.add(f"c{n}")
    store.set_room(closed=True)  # seq 9
    feed = Feed.load(store, CONTENT, window_size=3, settle=Releases(),
                     closed_poll_after_ms=CLOSED_PAUSE)
    old = feed.page_after(1, 3)  # below the window: from the store
    assert store.calls["changes_since"] == 2
    assert seqs(old) == [2, 3, 4] and page(old)["room"]["closed"] is True
    assert old.poll_after_ms == CLOSED_PAUSE
