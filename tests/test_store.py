"""The store on PostgreSQL and SQLite: seqs, tombstones, pages, a gap-free
feed, and the one error it raises when the database fails."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest

from service.common.errors import StoreUnavailable
from service.db.engines import DATABASE_ERRORS, create_engine
from service.db.idempotency import IdempotencyKey, KeyReused
from service.db.limits import PostLimit, RateLimited
from service.db.replies import EXCERPT_CHARS, ParentDeleted, ParentMissing
from service.db.store import Comment, Store

FIXED = datetime(2026, 11, 26, 9, 0, 0, 123456, tzinfo=UTC)


def test_seqs_count_per_content(store):
    """Each content's comments are numbered 1, 2, 3 on their own."""
    assert [store.add_comment(1, 7, f"a{i}").seq for i in range(3)] == [1, 2, 3]
    assert [store.add_comment(2, 7, f"b{i}").seq for i in range(2)] == [1, 2]
    assert store.add_comment(1, 8, "a3").seq == 4
    assert store.current_seq(1) == 4
    assert store.current_seq(2) == 2
    assert store.current_seq(3) == 0


def test_added_comment_is_returned_in_full(store):
    comment = store.add_comment(10, 42, "hello")
    assert comment.id > 0
    assert comment.content_id == 10
    assert comment.author_id == 42
    assert comment.body == "hello"
    assert comment.seq == 1
    assert comment.deleted is False
    assert store.get_comment(10, comment.id) == comment


def test_ids_are_global(store):
    """Comment ids are unique across contents."""
    ids = [store.add_comment(content, 1, "x").id for content in (1, 2, 1, 3)]
    assert len(set(ids)) == 4


@pytest.mark.parametrize(
    "body",
    [
        "caf\u00e9 \u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9 \u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
        "\U0001f600\U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1fa\U0001f1e6",
        "line one\nline two\r\n\ttabbed\n",
        "<script>alert(1)</script>",
        "'; DROP TABLE comments; --",
        "  leading and trailing spaces  ",
        "x" * 2000,
    ],
)
def test_bodies_stored_verbatim(store, body):
    """What the viewer typed comes back byte for byte; no escaping or trimming in storage."""
    comment = store.add_comment(1, 1, body)
    assert comment.body == body
    assert store.get_comment(1, comment.id).body == body
    assert store.changes_since(1, 0, 10)[0].body == body
    assert store.latest(1, 10)[0][0].body == body


def test_created_at_is_utc_aware(store):
    """Timestamps come back as aware UTC datetimes, on SQLite too."""
    before = datetime.now(UTC)
    comment = store.add_comment(1, 1, "now")
    after = datetime.now(UTC)
    for read in (comment, store.get_comment(1, comment.id), store.changes_since(1, 0, 1)[0]):
        assert read.created_at.tzinfo is not None
        assert read.created_at.utcoffset() == timedelta(0)
        assert before - timedelta(seconds=1) <= read.created_at <= after + timedelta(seconds=1)


def test_created_at_keeps_microseconds(make_store, database_url):
    """The stored time is the clock's time exactly, microseconds included."""
    store = make_store(database_url, clock=lambda: FIXED)
    comment = store.add_comment(1, 1, "x")
    assert store.get_comment(1, comment.id).created_at == FIXED
    assert comment.to_json()["created_at"] == "2026-11-26T09:00:00.123456Z"


def test_to_json_format():
    """The API's comment object: RFC 3339 UTC with a Z, and exactly the contract's fields."""
    comment = Comment(
        id=5, content_id=3, author_id=9, body="hi",
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), seq=7, deleted=False,
    )
    assert comment.to_json() == {
        "id": 5,
        "content_id": 3,
        "author_id": 9,
        "body": "hi",
        "created_at": "2026-01-02T03:04:05.000000Z",
        "seq": 7,
        "deleted": False,
        "parent_id": None,
        "parent": None,
    }
    parsed = datetime.fromisoformat(comment.to_json()["created_at"].replace("Z", "+00:00"))
    assert parsed == comment.created_at


def test_a_reply_carries_its_parents_summary(store):
    """A reply names its parent and quotes its author and first 80
    characters, in the answer and read back; plain posts have no parent."""
    parent = store.add_comment(1, 7, "ü" * 100)
    reply = store.post_comment(1, 8, "agreed", parent_id=parent.id).comment
    assert reply.seq == parent.seq + 1
    assert reply.to_json()["parent_id"] == parent.id
    assert reply.to_json()["parent"] == {
        "id": parent.id, "author_id": 7, "excerpt": "ü" * EXCERPT_CHARS, "deleted": False}
    assert store.get_comment(1, reply.id) == reply
    assert store.changes_since(1, parent.seq, 10) == [reply]
    assert store.latest(1, 10)[0] == [parent, reply]
    # A reply to a reply is a reply like any other.
    again = store.post_comment(1, 7, "thanks", parent_id=reply.id).comment
    assert (again.parent_id, again.parent_excerpt) == (reply.id, "agreed")


def test_a_reply_needs_a_live_parent_of_its_content(store):
    """No such comment, another content's, or a tombstone: refused, nothing stored."""
    parent = store.add_comment(1, 7, "parent")
    other = store.add_comment(2, 7, "elsewhere")
    with pytest.raises(ParentMissing):
        store.post_comment(1, 8, "x", parent_id=parent.id + 1000)
    with pytest.raises(ParentMissing):
        store.post_comment(1, 8, "x", parent_id=other.id)
    store.delete_comment(1, parent.id)
    with pytest.raises(ParentDeleted):
        store.post_comment(1, 8, "x", parent_id=parent.id)
    with pytest.raises(ParentDeleted):
        store.post_comment(1, 8, "x", parent_id=parent.id, limit=PostLimit(5, 1),
                           key=IdempotencyKey("k", 60))
    assert store.current_seq(1) == 2
    assert store.post_comment(1, 8, "y", limit=PostLimit(1, 1000)).comment.seq == 3
    with pytest.raises(RateLimited):  # a refused reply took no token
        store.post_comment(1, 8, "z", limit=PostLimit(1, 1000))


def test_deleting_the_parent_clears_the_excerpt_of_its_replies(store):
    """The replies keep their seqs; read again they no longer quote it."""
    parent = store.add_comment(1, 7, "regrettable")
    reply = store.post_comment(1, 8, "quoted", parent_id=parent.id).comment
    store.delete_comment(1, parent.id)
    read = store.get_comment(1, reply.id)
    assert read.seq == reply.seq and read.body == "quoted"
    assert read.to_json()["parent"] == {
        "id": parent.id, "author_id": 7, "excerpt": None, "deleted": True}


def test_a_keyed_reply_is_replayed_with_its_parent(store):
    parent = store.add_comment(1, 7, "parent")
    key = IdempotencyKey("reply-1", 60)
    first = store.post_comment(1, 8, "r", key=key, parent_id=parent.id)
    again = store.post_comment(1, 8, "r", key=key, parent_id=parent.id)
    assert again.replayed and again.comment == first.comment
    assert again.comment.parent_excerpt == "parent"
    with pytest.raises(KeyReused):  # the same body to another parent is another request
        store.post_comment(1, 8, "r", key=key)


def test_tombstone_to_json_has_null_body(store):
    comment = store.add_comment(1, 1, "bye")
    data = store.delete_comment(1, comment.id).to_json()
    assert data["body"] is None
    assert data["deleted"] is True
    assert data["created_at"].endswith("Z")


def test_delete_makes_a_tombstone_at_a_new_seq(store):
    """Deleting moves the comment to the feed's end as a tombstone, so followers see it go."""
    first = store.add_comment(1, 1, "one")
    store.add_comment(1, 1, "two")
    tombstone = store.delete_comment(1, first.id)
    assert tombstone.id == first.id
    assert tombstone.seq == 3
    assert tombstone.body is None
    assert tombstone.deleted is True
    assert tombstone.author_id == first.author_id
    assert tombstone.created_at == first.created_at
    assert store.current_seq(1) == 3
    assert store.changes_since(1, 2, 10) == [tombstone]
    # The comment's old seq is gone from the feed: it is at seq 3 now.
    assert [c.seq for c in store.changes_since(1, 0, 10)] == [2, 3]


def test_second_delete_changes_nothing(store):
    """Deleting twice (two moderators at once, a retry) does not move the seq again."""
    comment = store.add_comment(1, 1, "x")
    tombstone = store.delete_comment(1, comment.id)
    again = store.delete_comment(1, comment.id)
    assert again == tombstone
    assert store.current_seq(1) == 2
    assert store.add_comment(1, 1, "y").seq == 3


def test_delete_unknown_or_other_contents_comment(store):
    """Unknown ids, and ids of another content, are not found and change nothing."""
    comment = store.add_comment(1, 1, "x")
    assert store.delete_comment(1, comment.id + 1000) is None
    assert store.delete_comment(2, comment.id) is None
    assert store.get_comment(2, comment.id) is None
    assert store.get_comment(1, comment.id).deleted is False
    assert store.current_seq(1) == 1
    assert store.current_seq(2) == 0


def test_changes_since_pages_with_limit(store):
    """A follower catches up page by page and sees every change once, in order."""
    added = [store.add_comment(1, 1, f"c{i}") for i in range(5)]
    store.add_comment(2, 1, "elsewhere")
    tombstone = store.delete_comment(1, added[1].id)
    pages, cursor = [], 0
    while True:
        page = store.changes_since(1, cursor, 2)
        if not page:
            break
        assert len(page) <= 2
        pages.append([c.seq for c in page])
        cursor = page[-1].seq
    assert pages == [[1, 3], [4, 5], [6]]
    assert store.changes_since(1, 5, 50) == [tombstone]
    assert store.changes_since(1, 6, 50) == []
    assert store.changes_since(1, 100, 50) == []
    assert all(c.content_id == 1 for c in store.changes_since(1, 0, 50))


def test_changes_since_counts_feed_queries(store):
    before = store.feed_queries
    store.changes_since(1, 0, 10)
    store.current_seq(1)
    assert store.feed_queries == before + 2


def test_latest_excludes_tombstones(store):
    """The first page a viewer gets shows live comments only, newest last, and the cursor."""
    a = store.add_comment(1, 1, "a")
    b = store.add_comment(1, 1, "b")
    c = store.add_comment(1, 1, "c")
    store.delete_comment(1, b.id)
    comments, cursor = store.latest(1, 50)
    assert [x.id for x in comments] == [a.id, c.id]
    assert cursor == 4 == store.current_seq(1)
    comments, cursor = store.latest(1, 1)
    assert [x.id for x in comments] == [c.id]
    assert cursor == 4


def test_latest_of_empty_and_all_deleted_content(store):
    assert store.latest(1, 50) == ([], 0)
    comment = store.add_comment(1, 1, "gone")
    store.delete_comment(1, comment.id)
    assert store.latest(1, 50) == ([], 2)


def test_health(store):
    assert store.is_healthy()
    assert store.has_schema()


@pytest.mark.parametrize("url", [
    pytest.param("postgresql+psycopg2://postgres@127.0.0.1:1/nothing", id="postgresql-refused"),
    pytest.param("sqlite:////nonexistent-livecomments-dir/x/comments.db", id="sqlite-no-directory"),
])
def test_a_database_that_does_not_answer_is_store_unavailable(url):
    """Every call raises the one error of ``service.common``, with a one-line
    message and the database's own error as its cause; health says no."""
    store = Store(create_engine(url, connect_timeout=2))
    calls = [
        lambda: store.current_seq(1), lambda: store.changes_since(1, 0, 10),
        lambda: store.latest(1, 10), lambda: store.get_comment(1, 1),
        lambda: store.add_comment(1, 1, "x"),
        lambda: store.post_comment(1, 1, "x", limit=PostLimit(5, 10)),
        lambda: store.delete_comment(1, 1), store.has_schema,
    ]
    try:
        for call in calls:
            with pytest.raises(StoreUnavailable) as raised:
                call()
            assert isinstance(raised.value.__cause__, DATABASE_ERRORS)
            assert str(raised.value) and "\n" not in str(raised.value)
        assert not store.is_healthy()
    finally:
        store.dispose()


def test_a_drivers_own_error_is_store_unavailable_too(store):
    """A driver's error that escaped SQLAlchemy (a pool resetting a
    connection the server closed) leaves the store as StoreUnavailable too."""
    escaped = psycopg2.InterfaceError if store.dialect == "postgresql" else sqlite3.OperationalError

    def work(conn):
        raise escaped("connection already closed")

    with pytest.raises(StoreUnavailable, match="connection already closed"):
        store._run(store._reader, work)


# -- the changes feed under concurrency ---------------------------------------

WRITERS = 8
PER_WRITER = 250
READERS = 4
PAGE = 200


def test_feed_is_gap_free_under_concurrent_writers(store):
    """Followers of one busy content see every comment exactly once, seqs 1..N without gaps.

    8 writer threads add 250 comments each to one content while 4 readers
    follow ``since`` cursors; every reader must end with all 2,000.
    """
    content = 77
    total = WRITERS * PER_WRITER
    written = {}
    written_lock = threading.Lock()
    writers_done = threading.Event()
    errors = []

    def writer(number):
        try:
            mine = {}
            for i in range(PER_WRITER):
                comment = store.add_comment(content, 1000 + number, f"w{number}-{i}")
                mine[comment.id] = comment.body
            with written_lock:
                written.update(mine)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader(seen):
        try:
            cursor = 0
            while True:
                done = writers_done.is_set()
                page = store.changes_since(content, cursor, PAGE)
                seen.extend(page)
                if page:
                    cursor = page[-1].seq
                elif done:
                    return
                else:
                    time.sleep(0.001)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    seen_by = [[] for _ in range(READERS)]
    readers = [threading.Thread(target=reader, args=(seen,), daemon=True) for seen in seen_by]
    writers = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(WRITERS)]
    started = time.monotonic()
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join(timeout=120)
    writers_done.set()
    for thread in readers:
        thread.join(timeout=60)
    elapsed = time.monotonic() - started
    assert not any(thread.is_alive() for thread in readers + writers), "threads hung"
    assert errors == []
    assert len(written) == total

    lost = max(total - len({c.id for c in seen} & written.keys()) for seen in seen_by)
    duplicated = max(len(seen) - len({c.id for c in seen}) for seen in seen_by)
    print(
        f"\n[{store.dialect}] gap-free feed: writers={WRITERS} readers={READERS} "
        f"comments={total} lost={lost} duplicated={duplicated} seconds={elapsed:.2f}"
    )
    for seen in seen_by:
        ids = [c.id for c in seen]
        assert len(ids) == total
        assert len(set(ids)) == total
        assert set(ids) == written.keys()
        assert [c.seq for c in seen] == list(range(1, total + 1))
        assert {c.id: c.body for c in seen} == written
    assert store.current_seq(content) == total


@pytest.mark.postgres
def test_writers_of_different_contents_do_not_wait_for_each_other(make_store, pg_url):
    """A slow writer on one content holds up that content only.

    An open transaction that has taken content A's next seq blocks other
    writers of A until it ends (that is what keeps seq order = commit order)
    but never a writer of content B.
    """
    store = make_store(pg_url)
    content_a, content_b = 1, 2
    results = {}

    def add(name, content):
        results[name] = store.add_comment(content, 1, name)

    conn = store.engine.connect()
    try:
        trans = conn.begin()
        assert store._next_seq(conn, content_a) == 1

        other = threading.Thread(target=add, args=("b", content_b), daemon=True)
        other.start()
        other.join(timeout=5)
        assert not other.is_alive(), "a writer of another content was blocked"
        assert results["b"].seq == 1

        same = threading.Thread(target=add, args=("a", content_a), daemon=True)
        same.start()
        same.join(timeout=0.5)
        assert same.is_alive(), "a second writer of the same content was not made to wait"
        assert "a" not in results
        trans.rollback()
    finally:
        conn.close()
    same.join(timeout=5)
    assert not same.is_alive()
    # The rolled-back seq was never used: the waiting writer got seq 1.
    assert results["a"].seq == 1
    assert [c.body for c in store.changes_since(content_a, 0, 10)] == ["a"]
