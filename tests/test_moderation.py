"""Moderation (issue 15): bans with retraction, the room (closed, slow mode,
pinned comment), duplicates, and their routes, through WebTest on SQLite and
PostgreSQL, and the store's side of each (docs/api.md, "Moderation").

Every moderation action is a change of the content's feed at a seq of its
own; every refusal changes nothing. Times come from the store's clock,
which these tests move by hand (:class:`Clock`).
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import webtest
from bad_requests import assert_error_document

from service.db import moderation
from service.db.idempotency import IdempotencyKey
from service.db.limits import PostLimit, RateLimited
from service.db.store import UNCHANGED
from service.db.tables import bans, comments, content_events, content_seqs, rooms

MODERATOR = 99
RFC3339 = "%Y-%m-%dT%H:%M:%S.%fZ"


class Clock:
    """The store's clock, moved by the test."""

    def __init__(self):
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_clocked_app(make_app, clock):
    """``make_clocked_app(**settings)``: an app over this test's database
    whose store reads :class:`Clock`."""
    return lambda **overrides: make_app(store_options={"clock": clock}, **overrides)


@pytest.fixture
def client(make_clocked_app):
    return webtest.TestApp(make_clocked_app())


@pytest.fixture
def mod(token):
    return token(MODERATOR, "moderator")


# -- helpers -------------------------------------------------------------------


def post(client, content_id, body, auth, **kwargs):
    return client.post_json(f"/contents/{content_id}/comments", {"body": body},
                            headers={"Authorization": auth}, **kwargs)


def posted(client, content_id, body, auth):
    resp = post(client, content_id, body, auth)
    assert resp.status_int == 201, resp.body
    return resp.json


def ban(client, content_id, document, auth, **kwargs):
    return client.post_json(f"/contents/{content_id}/bans", document,
                            headers={"Authorization": auth}, **kwargs)


def patch_room(client, content_id, document, auth, **kwargs):
    return client.patch_json(f"/contents/{content_id}/room", document,
                             headers={"Authorization": auth}, **kwargs)


def room(client, content_id):
    resp = client.get(f"/contents/{content_id}/room")
    assert resp.status_int == 200 and resp.headers["Cache-Control"] == "no-store"
    return resp.json


def assert_error(resp, status, code):
    return assert_error_document(
        resp.status_int, resp.headers.get("Content-Type"), resp.body, status,
        where=f"{resp.request.method} {resp.request.path_qs}", code=code)


def changes_after(client, content_id, since, until_seq, timeout=20.0):
    """Every comment and event a reader following cursors from ``since``
    sees up to ``until_seq``, in the order it sees them (by seq)."""
    seen, cursor = [], since
    deadline = datetime.now(UTC) + timedelta(seconds=timeout)
    while cursor < until_seq:
        assert datetime.now(UTC) < deadline, f"feed stuck at {cursor}, expected {until_seq}"
        page = client.get(f"/contents/{content_id}/comments",
                          params={"since": cursor, "wait": 2}).json
        seen.extend(sorted(page["comments"] + page["events"], key=lambda c: c["seq"]))
        cursor = page["cursor"]
    return seen


def db_state(app):
    """Everything moderation and posts write, straight from the database."""
    with app.store.engine.connect() as conn:
        return {table.name: [tuple(row) for row in conn.execute(
                    sa.select(table).order_by(*table.primary_key.columns)).all()]
                for table in (comments, content_seqs, rooms, bans, content_events)}


# -- bans and retraction -------------------------------------------------------


def test_a_ban_with_retract_tombstones_each_comment_once_then_the_ban(client, token, mod):
    """Every live comment of the author becomes a tombstone at a new seq, in
    ascending id order; a reader at the old cursor sees each once, then the
    ban event; the pinned one among them is unpinned in between."""
    mine = [posted(client, 1, f"spam {n}", token(7)) for n in range(3)]
    other = posted(client, 1, "fine", token(8))
    posted(client, 2, "elsewhere", token(7))  # another content: untouched
    client.delete(f"/contents/1/comments/{mine[1]['id']}", headers={"Authorization": token(7)})
    patch_room(client, 1, {"pinned_comment_id": mine[2]["id"]}, mod)
    reader = client.get("/contents/1/comments").json
    cursor = reader["cursor"]
    assert reader["room"]["pinned"]["id"] == mine[2]["id"]

    resp = ban(client, 1, {"author_id": 7, "seconds": None, "retract": True,
                           "reason": "spam"}, mod)
    assert resp.status_int == 201
    assert resp.headers["Location"] == "/contents/1/bans/7"
    assert resp.headers["Cache-Control"] == "no-store"
    made = resp.json
    assert made["retracted"] == 2  # mine[1] was deleted already
    assert made["until"] is None and made["reason"] == "spam"
    assert made["moderator_id"] == MODERATOR and made["author_id"] == 7
    assert made["content_id"] == 1
    datetime.strptime(made["created_at"], RFC3339)

    seen = changes_after(client, 1, cursor, cursor + 4)
    assert [(c.get("id"), c.get("type"), c.get("deleted")) for c in seen] == [
        (mine[0]["id"], None, True), (mine[2]["id"], None, True),
        (None, "room", None), (None, "ban", None)]
    assert [c["seq"] for c in seen] == list(range(cursor + 1, cursor + 5))
    assert all(c["body"] is None for c in seen[:2])
    unpinned, banned = seen[2], seen[3]
    assert unpinned["room"] == {"closed": False, "slow_mode_seconds": 0, "pinned": None}
    assert unpinned["moderator_id"] == MODERATOR
    assert banned == {"seq": cursor + 4, "type": "ban", "author_id": 7, "until": None,
                      "reason": "spam", "retracted": 2, "moderator_id": MODERATOR,
                      "at": banned["at"]}
    # Once: nothing more after it, and the other comments are as they were.
    assert client.get("/contents/1/comments",
                      params={"since": cursor + 4, "wait": 0}).json["comments"] == []
    latest = client.get("/contents/1/comments").json
    assert [c["id"] for c in latest["comments"]] == [other["id"]]
    assert latest["room"]["pinned"] is None
    assert [c["body"] for c in client.get("/contents/2/comments").json["comments"]] == [
        "elsewhere"]


def test_a_ban_without_retract_keeps_the_comments(client, token, mod):
    kept = posted(client, 1, "kept", token(7))
    made = ban(client, 1, {"author_id": 7, "seconds": 600}, mod).json
    assert made["retracted"] == 0
    assert [c["id"] for c in client.get("/contents/1/comments").json["comments"]] == [kept["id"]]


def test_a_banned_author_gets_403_with_until_and_lifting_lets_them_post(client, token, mod,
                                                                        clock):
    posted(client, 1, "before", token(7))
    made = ban(client, 1, {"author_id": 7, "seconds": 600, "reason": "cool off"}, mod).json
    assert made["until"] == (clock.now + timedelta(seconds=600)).strftime(RFC3339)

    resp = post(client, 1, "after", token(7), expect_errors=True)
    document = assert_error(resp, 403, "banned")
    assert document["until"] == made["until"]
    assert resp.headers["Retry-After"] == "600"
    clock.advance(100)
    assert post(client, 1, "still", token(7), expect_errors=True).headers["Retry-After"] == "500"
    # Per content, and per author.
    posted(client, 2, "another content", token(7))
    posted(client, 1, "another author", token(8))

    resp = client.delete("/contents/1/bans/7", headers={"Authorization": mod})
    assert resp.status_int == 204 and resp.headers["Cache-Control"] == "no-store"
    posted(client, 1, "free again", token(7))
    assert_error(client.delete("/contents/1/bans/7", headers={"Authorization": mod},
                               expect_errors=True), 404, "not_found")


def test_a_ban_for_good_has_no_retry_after(client, token, mod):
    ban(client, 1, {"author_id": 7}, mod)
    resp = post(client, 1, "x", token(7), expect_errors=True)
    assert assert_error(resp, 403, "banned")["until"] is None
    assert "Retry-After" not in resp.headers


def test_a_timed_ban_ends_by_itself(client, token, mod, clock):
    ban(client, 1, {"author_id": 7, "seconds": 60}, mod)
    assert_error(post(client, 1, "x", token(7), expect_errors=True), 403, "banned")
    clock.advance(59)
    resp = post(client, 1, "x", token(7), expect_errors=True)
    assert_error(resp, 403, "banned")
    assert resp.headers["Retry-After"] == "1"
    clock.advance(1)
    posted(client, 1, "served my time", token(7))
    assert client.get("/contents/1/bans", headers={"Authorization": mod}).json["bans"] == []
    assert_error(client.delete("/contents/1/bans/7", headers={"Authorization": mod},
                               expect_errors=True), 404, "not_found")


def test_banning_again_replaces_the_ban(client, token, mod, clock):
    ban(client, 1, {"author_id": 7, "seconds": 60}, mod)
    again = ban(client, 1, {"author_id": 7, "seconds": 3600, "reason": "again"}, mod)
    assert again.status_int == 201
    listed = client.get("/contents/1/bans", headers={"Authorization": mod}).json["bans"]
    assert listed == [again.json]
    clock.advance(61)
    assert_error(post(client, 1, "x", token(7), expect_errors=True), 403, "banned")


def test_the_bans_in_force_are_listed_by_author(client, token, mod, clock):
    ban(client, 1, {"author_id": 9, "seconds": 10}, mod)
    ban(client, 1, {"author_id": 3}, mod)
    ban(client, 1, {"author_id": 5, "seconds": 600, "reason": "r"}, mod)
    ban(client, 2, {"author_id": 4}, mod)  # another content
    resp = client.get("/contents/1/bans", headers={"Authorization": mod})
    assert resp.status_int == 200 and resp.headers["Cache-Control"] == "no-store"
    assert resp.json["content_id"] == 1
    assert [b["author_id"] for b in resp.json["bans"]] == [3, 5, 9]
    five = resp.json["bans"][1]
    assert five == {"content_id": 1, "author_id": 5,
                    "until": (clock.now + timedelta(seconds=600)).strftime(RFC3339),
                    "reason": "r", "moderator_id": MODERATOR,
                    "created_at": clock.now.strftime(RFC3339), "retracted": 0}
    clock.advance(10)  # 9's ended
    assert [b["author_id"] for b in client.get(
        "/contents/1/bans", headers={"Authorization": mod}).json["bans"]] == [3, 5]
    assert client.get("/contents/3/bans", headers={"Authorization": mod}).json == {
        "content_id": 3, "bans": []}


def test_lifting_is_an_unban_event(client, token, mod):
    posted(client, 1, "x", token(1))
    cursor = client.get("/contents/1/comments").json["cursor"]
    ban(client, 1, {"author_id": 7}, mod)
    client.delete("/contents/1/bans/7", headers={"Authorization": mod})
    seen = changes_after(client, 1, cursor, cursor + 2)
    assert [(e["type"], e["author_id"], e["moderator_id"]) for e in seen] == [
        ("ban", 7, MODERATOR), ("unban", 7, MODERATOR)]
    assert set(seen[1]) == {"seq", "type", "author_id", "moderator_id", "at"}


# -- slow mode -----------------------------------------------------------------


def test_slow_mode_429_with_retry_after(client, token, mod, clock):
    resp = patch_room(client, 1, {"slow_mode_seconds": 30}, mod)
    assert resp.json == {"closed": False, "slow_mode_seconds": 30, "pinned": None}
    assert resp.headers["Cache-Control"] == "no-store"
    posted(client, 1, "first", token(7))
    clock.advance(10.5)
    resp = post(client, 1, "second", token(7), expect_errors=True)
    assert_error(resp, 429, "slow_mode")
    assert resp.headers["Retry-After"] == "20"  # 19.5, rounded up
    posted(client, 1, "someone else", token(8))
    posted(client, 2, "another content", token(7))
    clock.advance(19.5)
    posted(client, 1, "second", token(7))
    patch_room(client, 1, {"slow_mode_seconds": 0}, mod)
    posted(client, 1, "third", token(7))


def test_slow_mode_comes_before_the_posting_limit_and_takes_no_token(make_clocked_app,
                                                                     token, mod, clock):
    client = webtest.TestApp(make_clocked_app(post_rate="2/60"))
    patch_room(client, 1, {"slow_mode_seconds": 10}, mod)
    posted(client, 1, "one", token(7))
    clock.advance(1)
    assert_error(post(client, 1, "early", token(7), expect_errors=True), 429, "slow_mode")
    assert_error(post(client, 1, "early", token(7), expect_errors=True), 429, "slow_mode")
    clock.advance(10)
    posted(client, 1, "two", token(7))  # the refusals took no token
    clock.advance(11)
    resp = post(client, 1, "three", token(7), expect_errors=True)
    assert_error(resp, 429, "rate_limited")  # slow mode allows it, the bucket does not
    assert resp.headers["Retry-After"] == "8"  # the bucket: 2 per 60 s, from 0 and 11 s


def test_moderators_are_exempt_from_slow_mode(client, token, mod):
    patch_room(client, 1, {"slow_mode_seconds": 600}, mod)
    posted(client, 1, "one", mod)
    posted(client, 1, "two", mod)
    posted(client, 1, "three", token(7))
    assert_error(post(client, 1, "four", token(7), expect_errors=True), 429, "slow_mode")


# -- closing -------------------------------------------------------------------


def test_a_closed_content_refuses_every_post_until_reopened(client, token, mod):
    posted(client, 1, "open", token(7))
    ban(client, 1, {"author_id": 8}, mod)
    resp = patch_room(client, 1, {"closed": True}, mod)
    assert resp.json == {"closed": True, "slow_mode_seconds": 0, "pinned": None}
    assert room(client, 1)["closed"] is True
    assert_error(post(client, 1, "late", token(7), expect_errors=True), 409, "closed")
    assert_error(post(client, 1, "late", mod, expect_errors=True), 409, "closed")
    # Closed is checked first: a banned author hears "closed".
    assert_error(post(client, 1, "late", token(8), expect_errors=True), 409, "closed")
    posted(client, 2, "other contents are open", token(7))
    patch_room(client, 1, {"closed": False}, mod)
    posted(client, 1, "reopened", token(7))
    assert_error(post(client, 1, "still banned", token(8), expect_errors=True), 403, "banned")


def test_a_patch_that_changes_nothing_adds_no_change(client, token, mod):
    posted(client, 1, "x", token(1))
    patch_room(client, 1, {"slow_mode_seconds": 5, "closed": False}, mod)
    cursor = client.get("/contents/1/comments").json["cursor"]
    resp = patch_room(client, 1, {"slow_mode_seconds": 5, "pinned_comment_id": None}, mod)
    assert resp.status_int == 200
    assert resp.json == {"closed": False, "slow_mode_seconds": 5, "pinned": None}
    # No event: the next change is the next post, at the very next seq.
    assert posted(client, 1, "y", token(2))["seq"] == cursor + 1


def test_a_content_nobody_moderated_has_the_default_room_and_no_row(client, make_store,
                                                                    database_url):
    assert room(client, 5) == {"closed": False, "slow_mode_seconds": 0, "pinned": None}
    with make_store(database_url).engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(rooms)).scalar() == 0


# -- pinning -------------------------------------------------------------------


def test_pin_and_unpin(client, token, mod):
    first = posted(client, 1, "pin me", token(7))
    second = posted(client, 1, "then me", token(8))
    resp = patch_room(client, 1, {"pinned_comment_id": first["id"]}, mod)
    assert resp.json["pinned"] == first
    assert room(client, 1)["pinned"] == first
    cursor = client.get("/contents/1/comments").json["cursor"]
    patch_room(client, 1, {"pinned_comment_id": second["id"]}, mod)
    patch_room(client, 1, {"pinned_comment_id": None}, mod)
    assert room(client, 1)["pinned"] is None
    # Two room changes; a reader behind both gets the newer only (a room
    # event is whole: it replaces the one before it in the feed).
    seen = changes_after(client, 1, cursor, cursor + 2)
    assert [(e["seq"], e["type"], e["room"]["pinned"], e["moderator_id"]) for e in seen] == [
        (cursor + 2, "room", None, MODERATOR)]
    assert changes_after(client, 1, cursor, cursor + 1) != []


def test_deleting_the_pinned_comment_unpins_it(client, token, mod):
    pinned = posted(client, 1, "pinned", token(7))
    patch_room(client, 1, {"pinned_comment_id": pinned["id"], "slow_mode_seconds": 3}, mod)
    cursor = client.get("/contents/1/comments").json["cursor"]
    resp = client.delete(f"/contents/1/comments/{pinned['id']}",
                         headers={"Authorization": token(7)})
    assert resp.status_int == 204
    assert room(client, 1) == {"closed": False, "slow_mode_seconds": 3, "pinned": None}
    seen = changes_after(client, 1, cursor, cursor + 2)
    assert (seen[0]["id"], seen[0]["deleted"]) == (pinned["id"], True)
    assert seen[1]["type"] == "room" and seen[1]["moderator_id"] is None
    assert seen[1]["room"] == {"closed": False, "slow_mode_seconds": 3, "pinned": None}
    # Deleting another comment does not touch the room.
    other = posted(client, 1, "other", token(8))
    patch_room(client, 1, {"pinned_comment_id": other["id"]}, mod)
    gone = posted(client, 1, "gone", token(9))
    client.delete(f"/contents/1/comments/{gone['id']}", headers={"Authorization": mod})
    assert room(client, 1)["pinned"]["id"] == other["id"]


# -- duplicates ----------------------------------------------------------------


def test_the_same_comment_twice_within_the_window_is_a_duplicate(client, token, clock):
    posted(client, 1, "same", token(7))
    clock.advance(29)
    assert_error(post(client, 1, "same", token(7), expect_errors=True), 409, "duplicate")
    posted(client, 1, "same", token(8))  # another author
    posted(client, 2, "same", token(7))  # another content
    posted(client, 1, "different", token(7))
    clock.advance(1.5)  # the window is 30 s
    posted(client, 1, "same", token(7))


def test_a_deleted_comment_is_no_duplicate(client, token):
    first = posted(client, 1, "oops", token(7))
    client.delete(f"/contents/1/comments/{first['id']}", headers={"Authorization": token(7)})
    posted(client, 1, "oops", token(7))


def test_no_duplicates_with_the_window_at_0(make_clocked_app, token):
    client = webtest.TestApp(make_clocked_app(duplicate_window=0))
    posted(client, 1, "same", token(7))
    posted(client, 1, "same", token(7))


def test_a_retry_with_its_idempotency_key_is_a_replay_not_a_duplicate(client, token):
    headers = {"Authorization": token(7), "Idempotency-Key": "retry-1"}
    first = client.post_json("/contents/1/comments", {"body": "once"}, headers=headers)
    again = client.post_json("/contents/1/comments", {"body": "once"}, headers=headers)
    assert again.status_int == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json == first.json
    # A new key with the same body is a new post: a duplicate.
    resp = client.post_json("/contents/1/comments", {"body": "once"},
                            headers={**headers, "Idempotency-Key": "retry-2"},
                            expect_errors=True)
    assert_error(resp, 409, "duplicate")


# -- bad requests change nothing -----------------------------------------------

BAD_BANS = [
    ("no author", {}),
    ("author a string", {"author_id": "7"}),
    ("author 0", {"author_id": 0}),
    ("author negative", {"author_id": -7}),
    ("author fraction", {"author_id": 7.5}),
    ("author true", {"author_id": True}),
    ("author too large", {"author_id": 2**63}),
    ("author null", {"author_id": None}),
    ("seconds 0", {"author_id": 7, "seconds": 0}),
    ("seconds negative", {"author_id": 7, "seconds": -60}),
    ("seconds over a year", {"author_id": 7, "seconds": 31_536_001}),
    ("seconds a string", {"author_id": 7, "seconds": "60"}),
    ("seconds fraction", {"author_id": 7, "seconds": 1.5}),
    ("seconds true", {"author_id": 7, "seconds": True}),
    ("retract a string", {"author_id": 7, "retract": "yes"}),
    ("retract 1", {"author_id": 7, "retract": 1}),
    ("retract null", {"author_id": 7, "retract": None}),
    ("reason too long", {"author_id": 7, "reason": "x" * 201}),
    ("reason a number", {"author_id": 7, "reason": 5}),
    ("reason with NUL", {"author_id": 7, "reason": "a\x00b"}),
    ("unknown field", {"author_id": 7, "forever": True}),
    ("not an object", [7]),
    ("the moderator themself", {"author_id": MODERATOR, "retract": True}),
]

BAD_PATCHES = [
    ("empty", {}),
    ("unknown field", {"closed": True, "locked": True}),
    ("slow negative", {"slow_mode_seconds": -1}),
    ("slow over 600", {"slow_mode_seconds": 601}),
    ("slow a string", {"slow_mode_seconds": "10"}),
    ("slow fraction", {"slow_mode_seconds": 1.5}),
    ("slow true", {"slow_mode_seconds": True}),
    ("slow null", {"slow_mode_seconds": None}),
    ("closed a string", {"closed": "true"}),
    ("closed 1", {"closed": 1}),
    ("closed null", {"closed": None}),
    ("pin 0", {"pinned_comment_id": 0}),
    ("pin a string", {"pinned_comment_id": "1"}),
    ("pin true", {"pinned_comment_id": True}),
    ("not an object", [1]),
]


@pytest.fixture
def moderated(make_clocked_app, token, mod):
    """An app whose content 1 has comments (one deleted), a ban, a room;
    content 2 a comment of its own."""
    app = make_clocked_app()
    client = webtest.TestApp(app)
    live = posted(client, 1, "live", token(7))
    dead = posted(client, 1, "dead", token(7))
    client.delete(f"/contents/1/comments/{dead['id']}", headers={"Authorization": mod})
    elsewhere = posted(client, 2, "elsewhere", token(7))
    ban(client, 1, {"author_id": 8, "seconds": 60}, mod)
    patch_room(client, 1, {"slow_mode_seconds": 5, "pinned_comment_id": live["id"]}, mod)
    return app, client, {"live": live, "dead": dead, "elsewhere": elsewhere}


@pytest.mark.parametrize("case,document", BAD_BANS, ids=[c for c, _ in BAD_BANS])
def test_a_bad_ban_is_400_and_changes_nothing(moderated, mod, case, document):
    app, client, _ = moderated
    state = db_state(app)
    resp = ban(client, 1, document, mod, expect_errors=True)
    error = assert_error(resp, 400, "invalid_request")
    if case == "the moderator themself":
        assert error["description"] == "a moderator cannot ban themself"
    assert db_state(app) == state


@pytest.mark.parametrize("case,document", BAD_PATCHES, ids=[c for c, _ in BAD_PATCHES])
def test_a_bad_room_patch_is_400_and_changes_nothing(moderated, mod, case, document):
    app, client, _ = moderated
    state = db_state(app)
    assert_error(patch_room(client, 1, document, mod, expect_errors=True), 400,
                 "invalid_request")
    assert db_state(app) == state


@pytest.mark.parametrize("which,title", [("elsewhere", "No such comment"),
                                         ("missing", "No such comment"),
                                         ("dead", "Comment deleted")])
def test_pinning_what_cannot_be_pinned_is_400_and_changes_nothing(moderated, mod, which,
                                                                   title):
    app, client, made = moderated
    comment_id = made["live"]["id"] + 1000 if which == "missing" else made[which]["id"]
    state = db_state(app)
    resp = patch_room(client, 1, {"closed": True, "pinned_comment_id": comment_id}, mod,
                      expect_errors=True)
    assert assert_error(resp, 400, "invalid_request")["title"] == title
    assert db_state(app) == state
    assert room(client, 1)["closed"] is False


def test_bad_bodies_and_paths_are_refused(moderated, mod):
    app, client, _ = moderated
    state = db_state(app)
    headers = {"Authorization": mod}
    for method, path, body, content_type, status in [
        ("POST", "/contents/1/bans", b"{", "application/json", 400),
        ("POST", "/contents/1/bans", b'{"author_id": 7}', "text/plain", 415),
        ("PATCH", "/contents/1/room", b"closed", "application/json", 400),
        ("PATCH", "/contents/1/room", b'{"closed": true}', None, 415),
        ("POST", "/contents/0/bans", b'{"author_id": 7}', "application/json", 400),
        ("PATCH", "/contents/x/room", b'{"closed": true}', "application/json", 400),
        ("DELETE", "/contents/1/bans/abc", None, None, 400),
        ("DELETE", "/contents/1/bans/0", None, None, 400),
        ("GET", "/contents/-1/bans", None, None, 400),
        ("GET", "/contents/1/room/", None, None, 404),
    ]:
        resp = client.request(path, method=method, body=body or b"", headers=headers,
                              content_type=content_type, expect_errors=True)
        code = {400: "invalid_request", 404: "not_found", 415: "unsupported_media_type"}[status]
        assert_error(resp, status, code)
    assert db_state(app) == state


# -- who may moderate ----------------------------------------------------------

ROUTES = [
    ("POST", "/contents/1/bans", {"author_id": 7}),
    ("GET", "/contents/1/bans", None),
    ("DELETE", "/contents/1/bans/8", None),
    ("PATCH", "/contents/1/room", {"closed": True}),
]


@pytest.mark.parametrize("method,path,document", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_a_users_token_is_403_and_none_is_401_on_every_moderation_route(
        moderated, token, method, path, document):
    app, client, _ = moderated
    state = db_state(app)
    body = b"" if document is None else json.dumps(document).encode()
    for auth, status, code in [(token(7), 403, "forbidden"), (None, 401, "unauthorized"),
                               ("Bearer forged.token", 401, "unauthorized")]:
        headers = {} if auth is None else {"Authorization": auth}
        resp = client.request(path, method=method, body=body, headers=headers,
                              content_type="application/json" if body else None,
                              expect_errors=True)
        assert_error(resp, status, code)
        assert resp.headers["Cache-Control"] == "no-store"
    assert db_state(app) == state


def test_anyone_may_read_the_room(moderated):
    _, client, made = moderated
    assert room(client, 1) == {"closed": False, "slow_mode_seconds": 5,
                               "pinned": made["live"]}


# -- many processes, one database ----------------------------------------------


@pytest.mark.postgres
def test_a_ban_through_one_process_holds_on_another(make_app_at, pg_url, token, mod):
    """Two apps over one PostgreSQL database are two processes' view: what
    one moderates, the other refuses at once (the database is the truth),
    and the other's viewers see the changes."""
    first = webtest.TestApp(make_app_at(pg_url))
    second = webtest.TestApp(make_app_at(pg_url))
    comment = posted(second, 1, "before", token(7))
    cursor = second.get("/contents/1/comments").json["cursor"]  # second watches content 1
    ban(first, 1, {"author_id": 7, "retract": True}, mod)
    assert_error(post(second, 1, "after", token(7), expect_errors=True), 403, "banned")
    patch_room(first, 1, {"slow_mode_seconds": 60}, mod)
    one = posted(second, 1, "one", token(8))
    assert_error(post(second, 1, "two", token(8), expect_errors=True), 429, "slow_mode")
    patch_room(first, 1, {"closed": True}, mod)
    assert_error(post(second, 1, "three", token(9), expect_errors=True), 409, "closed")
    assert room(second, 1)["closed"] is True
    # The second process's viewers see it all; the slow mode's room event
    # only if they read before the closing replaced it (its process learns
    # of each change when NOTIFY or its poller brings it).
    seen = changes_after(second, 1, cursor, cursor + 5)
    assert [(c.get("id"), c.get("type")) for c in seen if c.get("room", {}) != {
        "closed": False, "slow_mode_seconds": 60, "pinned": None}] == [
        (comment["id"], None), (None, "ban"), (one["id"], None), (None, "room")]
    assert seen[-1]["room"] == {"closed": True, "slow_mode_seconds": 60, "pinned": None}
    first.delete("/contents/1/bans/7", headers={"Authorization": mod})
    patch_room(first, 1, {"closed": False, "slow_mode_seconds": 0}, mod)
    posted(second, 1, "back", token(7))


@pytest.mark.postgres
def test_concurrent_posts_never_slip_past_a_ban(make_store, pg_url):
    """Writers post as fast as they can (the quick path and the
    transaction's) while a moderator bans one of them with retraction:
    after the ban's seq no comment of theirs exists, and before it none is
    left alive."""
    store = make_store(pg_url)
    stop = threading.Event()
    errors = []

    def write(author, keyed):
        n = 0
        while not stop.is_set():
            n += 1
            key = IdempotencyKey(f"{author}-{n}", 60) if keyed else None
            try:
                store.post_comment(1, author, f"{author} {n}", key=key,
                                   limit=PostLimit(10**6, 1))
            except moderation.Banned:
                pass
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    writers = [threading.Thread(target=write, args=(author, keyed))
               for author in (7, 8) for keyed in (False, True)]
    for thread in writers:
        thread.start()
    try:
        while store.current_seq(1) < 50:
            pass
        made = store.ban(1, 7, retract=True, moderator_id=MODERATOR)
        while store.current_seq(1) < made.seq + 50:
            pass
    finally:
        stop.set()
        for thread in writers:
            thread.join()
    assert errors == []
    changes = store.changes_since(1, 0, 10**6)
    seqs = [c.seq for c in changes]  # a tombstone moved to a new seq leaves a gap
    assert seqs == sorted(set(seqs)) and seqs[-1] == store.current_seq(1)
    sevens = [c for c in changes if c.is_comment and c.author_id == 7]
    assert made.retracted > 0
    assert all(c.seq < made.seq for c in sevens)
    assert all(c.deleted for c in sevens)
    assert any(c.is_comment and c.author_id == 8 and c.seq > made.seq for c in changes)


# -- the store -----------------------------------------------------------------


def test_changes_merge_comments_and_events_by_seq_cut_at_limit(store):
    a = store.add_comment(1, 7, "a")
    room_, event = store.set_room(1, MODERATOR, closed=False, slow_mode_seconds=5)
    b = store.add_comment(1, 8, "b")
    made = store.ban(1, 8, seconds=60, retract=True, reason=None, moderator_id=MODERATOR)
    assert (event.seq, made.seq, made.retracted) == (2, 5, 1)
    changes = store.changes_since(1, 0, 100)
    assert [(c.seq, c.is_comment) for c in changes] == [
        (1, True), (2, False), (4, True), (5, False)]  # b moved from 3 to 4
    assert changes[2].id == b.id and changes[2].deleted
    assert changes[0] == a
    assert changes[1] == event and event.to_json() == {
        "seq": 2, "type": "room", "room": {"closed": False, "slow_mode_seconds": 5,
                                           "pinned": None},
        "moderator_id": MODERATOR, "at": event.created_at.strftime(RFC3339)}
    assert room_.to_json() == event.data["room"]
    assert [c.seq for c in store.changes_since(1, 0, 2)] == [1, 2]
    assert [c.seq for c in store.changes_since(1, 1, 2)] == [2, 4]
    assert [c.seq for c in store.changes_since(1, 4, 2)] == [5]
    assert store.changes_since(1, 5, 2) == []
    assert store.current_seq(1) == 5
    assert store.changes_since(2, 0, 10) == []


def test_what_changes_nothing_takes_no_seq(store):
    store.add_comment(1, 7, "a")
    assert store.set_room(1, MODERATOR, slow_mode_seconds=0, closed=False,
                          pinned_comment_id=None) == (store.room(1), None)
    assert store.set_room(1, MODERATOR) == (store.room(1), None)
    assert store.lift_ban(1, 7, MODERATOR) is None
    assert store.remove_comment(1, 999) is None
    with pytest.raises(moderation.InvalidPin) as missing:
        store.set_room(1, MODERATOR, closed=True, pinned_comment_id=999)
    assert missing.value.reason == "missing"
    assert store.current_seq(1) == 1 and store.room(1).closed is False
    assert store.add_comment(1, 7, "b").seq == 2


def test_the_store_refuses_posts_in_the_specs_order(make_store, database_url, clock):
    store = make_store(database_url, clock=clock)
    post = store.post_comment
    post(1, 7, "x", duplicate_window=30)
    with pytest.raises(moderation.Duplicate):
        post(1, 7, "x", duplicate_window=30)
    store.set_room(1, MODERATOR, slow_mode_seconds=60)
    with pytest.raises(moderation.SlowMode) as slow:
        post(1, 7, "x", duplicate_window=30)
    assert slow.value.retry_after == 60
    assert post(1, 7, "y", exempt_slow_mode=True).comment.seq == 3
    store.ban(1, 7, seconds=10, moderator_id=MODERATOR)
    with pytest.raises(moderation.Banned) as banned:
        post(1, 7, "x", duplicate_window=30)
    assert (banned.value.until, banned.value.retry_after) == (
        clock.now + timedelta(seconds=10), 10)
    store.set_room(1, MODERATOR, closed=True)
    with pytest.raises(moderation.Closed):
        post(1, 7, "x", duplicate_window=30)
    # A post refused by the bucket stores nothing either, and takes no seq.
    store.set_room(1, MODERATOR, closed=False, slow_mode_seconds=0)
    limit = PostLimit(1, 60)
    post(1, 8, "first", limit=limit)
    seq = store.current_seq(1)
    with pytest.raises(RateLimited):
        post(1, 8, "second", limit=limit)
    assert store.current_seq(1) == seq


def test_set_room_keeps_the_pin_unless_told(store):
    comment = store.add_comment(1, 7, "a")
    room_, _ = store.set_room(1, MODERATOR, pinned_comment_id=comment.id)
    assert room_.pinned == comment
    room_, event = store.set_room(1, MODERATOR, closed=True, pinned_comment_id=UNCHANGED)
    assert room_.pinned == comment and room_.closed and event is not None
    assert store.room(1) == room_
    tombstone = store.delete_comment(1, comment.id)
    assert store.room(1).pinned is None and store.room(1).closed
    with pytest.raises(moderation.InvalidPin) as deleted:
        store.set_room(1, MODERATOR, pinned_comment_id=tombstone.id)
    assert deleted.value.reason == "deleted"
