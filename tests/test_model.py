"""The feed against a model: a hypothesis state machine posts, replies,
deletes, moderates (bans with and without retraction, timed or for good,
lifted; slow mode; closing and reopening; pinning), moves the store's
clock, polls with random cursors and limits, reconnects followers and
restarts the app, and checks every answer against a plain in-memory model.

The model is the contract in a few lines: every change takes the content's
next seq; a deletion moves the comment to a new seq as a tombstone; a
moderation action is an event at a seq of its own (a retraction: a
tombstone per live comment of the author, in id order, then the unpinning
if the pinned one was among them, then the ban); a read after cursor C
returns the changes with seq above C in order, at most ``limit``, where a
``room`` event a newer one replaced may be left out; the latest page is
the newest live comments. A post is refused, storing nothing, in the
spec's order: closed (409), banned (403, ``until``, ``Retry-After`` for a
timed ban), slow mode (429, moderators exempt), duplicate within the window
(409), then its parent: none of this content's (400) or a tombstone (409).

Invariants, after every step: the feed read from cursor 0 to its end is
the model (comments, tombstones and events, in seq order) and each page's
``room`` the model's room; ``GET /room`` is the model's room exactly and
``GET /bans`` lists the model's bans in force. Every refused request
leaves the database as it was. The machine runs on SQLite and, fewer
times, on PostgreSQL, where a post without a key or parent takes the
quick path; CI draws the same runs every time.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import webtest
from conftest import (
    IN_CI,
    PG_URL,
    SECRET,
    make_settings,
    notify_channel_for,
    require_postgres,
    with_search_path,
)
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from service.app import create_app
from service.db.store import Store, create_engine
from service.db.tables import metadata
from service.web.auth import TokenSigner

CONTENTS = (1, 2)
AUTHORS = (1, 2)
MODERATOR = 99
DUPLICATE_WINDOW = 30
CLOSED_POLL_AFTER_MS = 300_000
#: A read of the whole feed in one page (a step adds a few changes at most).
WALK_LIMIT = 200
#: Examples (runs of the machine) per test run: CI draws the same ones
#: every run (derandomized), so a red run is the code's, not the draw's.
EXAMPLES = int(os.environ.get("LIVECOMMENTS_MODEL_EXAMPLES", 100))
#: The same on PostgreSQL, where each run costs more (a schema of its own).
PG_EXAMPLES = int(os.environ.get("LIVECOMMENTS_MODEL_PG_EXAMPLES", 30))
BODIES = st.one_of(
    # A few bodies again and again, so that duplicates are met often.
    st.sampled_from(["first!", "same again"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            min_size=1, max_size=30).filter(lambda body: body.strip()),
)
BAN_SECONDS = st.sampled_from([None, 1, 30, 60, 600])
SLOW_MODE_SECONDS = st.sampled_from([0, 5, 30, 600])
#: Clock steps around the windows above: slow mode, the duplicate window
#: (30 s) and timed bans end exactly on some of them.
TICKS = st.sampled_from([0.5, 1, 4, 5, 25, 29.5, 30, 31, 60, 601])


def rfc3339(when):
    return None if when is None else when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Clock:
    """The store's clock, moved only by the machine's ``tick``."""

    def __init__(self):
        self.now = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)

    def __call__(self):
        return self.now


class Model:
    """What the contract promises, for one content."""

    def __init__(self, content_id):
        self.content_id = content_id
        self.seq = 0
        # id -> {"seq", "author_id", "body", "deleted", "parent_id", "at", "json"}
        self.comments = {}
        self.events = {}  # seq -> the event object, exactly
        self.closed = False
        self.slow_mode_seconds = 0
        self.pinned = None  # a live comment's id
        self.bans = {}  # author_id -> until (None: for good); ended ones may stay

    def _take(self):
        self.seq += 1
        return self.seq

    # -- posts -------------------------------------------------------------

    def banned_until(self, author_id, now):
        """(True, until) while a ban is in force, else (False, None)."""
        if author_id not in self.bans:
            return False, None
        until = self.bans[author_id]
        return (until is None or until > now), until

    def refusal(self, author_id, body, parent_id, *, moderator, now):
        """The refusal a post meets, as (status, code, headers, extra
        document fields), or None. The spec's order."""
        if self.closed:
            return 409, "closed", {}, {}
        banned, until = self.banned_until(author_id, now)
        if banned:
            headers = {} if until is None else {
                "Retry-After": str(max(1, math.ceil((until - now).total_seconds())))}
            return 403, "banned", headers, {"until": rfc3339(until)}
        mine = [c for c in self.comments.values() if c["author_id"] == author_id]
        if self.slow_mode_seconds and not moderator and mine:
            # Tombstones count: the previous *post* is what slow mode spaces.
            ready = max(c["at"] for c in mine) + timedelta(seconds=self.slow_mode_seconds)
            if ready > now:
                retry = max(1, math.ceil((ready - now).total_seconds()))
                return 429, "slow_mode", {"Retry-After": str(retry)}, {}
        since = now - timedelta(seconds=DUPLICATE_WINDOW)
        if any(not c["deleted"] and c["body"] == body and c["at"] > since for c in mine):
            return 409, "duplicate", {}, {}
        if parent_id is not None:
            if parent_id not in self.comments:
                return 400, "invalid_request", {}, {}
            if self.comments[parent_id]["deleted"]:
                return 409, "parent_deleted", {}, {}
        return None

    def add(self, comment, now):
        self.comments[comment["id"]] = {
            "seq": self._take(), "author_id": comment["author_id"], "body": comment["body"],
            "deleted": False, "parent_id": comment["parent_id"], "at": now, "json": comment}

    def delete(self, comment_id, now):
        """A deletion (by anyone): the tombstone, then the unpinning."""
        if self.comments[comment_id]["deleted"]:
            return
        self._tombstone(comment_id)
        if self.pinned == comment_id:
            self._set_room(now, None, pinned=None)

    def _tombstone(self, comment_id):
        self.comments[comment_id].update(seq=self._take(), body=None, deleted=True)

    # -- moderation --------------------------------------------------------

    def ban(self, author_id, seconds, retract, reason, now):
        """Ban (and retract); the ban object the POST answers."""
        retracted = 0
        if retract:
            mine = sorted(cid for cid, c in self.comments.items()
                          if c["author_id"] == author_id and not c["deleted"])
            for comment_id in mine:
                self._tombstone(comment_id)
            retracted = len(mine)
            if self.pinned in mine:
                self._set_room(now, MODERATOR, pinned=None)
        until = None if seconds is None else now + timedelta(seconds=seconds)
        self.bans[author_id] = until
        seq = self._take()
        self.events[seq] = {"seq": seq, "type": "ban", "author_id": author_id,
                            "until": rfc3339(until), "reason": reason,
                            "moderator_id": MODERATOR, "retracted": retracted,
                            "at": rfc3339(now)}
        return {"content_id": self.content_id, "author_id": author_id,
                "until": rfc3339(until), "reason": reason, "moderator_id": MODERATOR,
                "created_at": rfc3339(now), "retracted": retracted}

    def lift(self, author_id, now):
        """Lift the author's ban; False (nothing changed) if none was in force."""
        if not self.banned_until(author_id, now)[0]:
            return False
        del self.bans[author_id]
        seq = self._take()
        self.events[seq] = {"seq": seq, "type": "unban", "author_id": author_id,
                            "moderator_id": MODERATOR, "at": rfc3339(now)}
        return True

    def patch(self, document, now):
        """A PATCH of the room: "refused" (a pin of what cannot be pinned),
        else whether it changed anything."""
        closed = document.get("closed", self.closed)
        slow = document.get("slow_mode_seconds", self.slow_mode_seconds)
        pinned = document.get("pinned_comment_id", self.pinned)
        if pinned != self.pinned and pinned is not None:
            comment = self.comments.get(pinned)
            if comment is None or comment["deleted"]:
                return "refused"
        if (closed, slow, pinned) == (self.closed, self.slow_mode_seconds, self.pinned):
            return False
        self._set_room(now, MODERATOR, closed=closed, slow_mode_seconds=slow, pinned=pinned)
        return True

    def _set_room(self, now, moderator_id, **changes):
        for name, value in changes.items():
            setattr(self, name, value)
        seq = self._take()
        self.events[seq] = {"seq": seq, "type": "room", "room": self.room_json(),
                            "moderator_id": moderator_id, "at": rfc3339(now)}

    # -- reads -------------------------------------------------------------

    def stored_json(self, comment_id):
        """A comment as the database has it now: a reply's quote of a
        deleted parent is cleared."""
        comment = dict(self.comments[comment_id]["json"])
        parent_id = comment["parent_id"]
        if parent_id is not None and self.comments[parent_id]["deleted"]:
            comment["parent"] = {**comment["parent"], "excerpt": None, "deleted": True}
        return comment

    def room_json(self):
        """The room as the database has it (``GET /room``, and a room event)."""
        pinned = None if self.pinned is None else self.stored_json(self.pinned)
        return {"closed": self.closed, "slow_mode_seconds": self.slow_mode_seconds,
                "pinned": pinned}

    def room_view(self):
        pinned = None if self.pinned is None else self._row(self.pinned, self.comments[self.pinned])
        return (self.closed, self.slow_mode_seconds, pinned)

    @staticmethod
    def _row(comment_id, c):
        return (comment_id, c["seq"], c["author_id"], c["deleted"], c["body"], c["parent_id"],
                rfc3339(c["at"]))

    def changes(self):
        """Every change there is, by seq: comment rows and event objects."""
        found = [(c["seq"], self._row(cid, c)) for cid, c in self.comments.items()]
        found.extend(self.events.items())
        return sorted(found, key=lambda change: change[0])

    def replaced_room_events(self):
        """The seqs of the room events a newer one replaced: a page may leave them out."""
        rooms = sorted(seq for seq, event in self.events.items() if event["type"] == "room")
        return set(rooms[:-1])

    def latest(self, limit):
        live = [(cid, c) for cid, c in self.comments.items() if not c["deleted"]]
        live.sort(key=lambda item: item[1]["seq"])
        return [self._row(cid, c) for cid, c in live[-limit:]]

    def live(self):
        return {cid: c["body"] for cid, c in self.comments.items() if not c["deleted"]}


def check_parent(comment):
    summary = comment["parent"]
    assert (summary is None) == (comment["parent_id"] is None)
    if summary is not None:  # as posted, or cleared once the parent is deleted
        assert summary["id"] == comment["parent_id"]
        assert (summary["excerpt"] is None) == summary["deleted"]


def row(comment):
    check_parent(comment)
    return (comment["id"], comment["seq"], comment["author_id"], comment["deleted"],
            comment["body"], comment["parent_id"], comment["created_at"])


def seen(page):
    """A page's changes as (seq, comment row or event object), by seq: the
    comments and the events each ascending, and no seq twice."""
    comments = [(c["seq"], row(c)) for c in page["comments"]]
    events = [(e["seq"], e) for e in page["events"]]
    for part in (comments, events):
        assert [seq for seq, _ in part] == sorted({seq for seq, _ in part})
    merged = sorted(comments + events, key=lambda change: change[0])
    assert len({seq for seq, _ in merged}) == len(merged), "a seq twice in one page"
    return merged


def room_view(room):
    """A page's room, its pinned comment as a row (a reply's quote as the
    page's feed last saw it: checked for consistency only)."""
    pinned = room["pinned"]
    return (room["closed"], room["slow_mode_seconds"], None if pinned is None else row(pinned))


class FeedMachine(RuleBasedStateMachine):
    """The machine on SQLite (a file of its own per run)."""

    def __init__(self):
        super().__init__()
        self.url = self._make_database()
        self.signer = TokenSigner(SECRET)
        self.clock = Clock()
        self.models = {content: Model(content) for content in CONTENTS}
        self.followers = {}  # content -> (cursor, {id: body})
        self.app = None
        #: The last post refused with a Retry-After, and it: (post, seconds).
        self.retry = None

    @initialize(posts=st.lists(st.tuples(st.sampled_from(CONTENTS), st.sampled_from(AUTHORS)),
                               max_size=6))
    def start(self, posts):
        """The app, and a few comments to moderate from the start."""
        self._start_app()
        for n, (content, author) in enumerate(posts):
            self._post(content, author, f"comment {n}")

    def _make_database(self):
        self.workdir = tempfile.mkdtemp(prefix="livecomments-model-")
        return f"sqlite:///{self.workdir}/model.db"

    def _drop_database(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _start_app(self):
        store = Store(create_engine(self.url, pool_size=5), clock=self.clock,
                      notify_channel=notify_channel_for(self.url))
        if not store.has_schema():
            store.create_schema()
        # A small window, so catch-up reads below it go to the store.
        self.app = create_app(
            # Pacing (tests/test_pacing.py) off: the model's pauses are the room's.
            make_settings(self.url, feed_window=3, poll_interval=0.2, busy_pace_ms=0,
                          duplicate_window=DUPLICATE_WINDOW,
                          closed_poll_after_ms=CLOSED_POLL_AFTER_MS),
            store=store)
        self.client = webtest.TestApp(self.app)

    def teardown(self):
        if self.app is not None:
            self.app.close()
        self._drop_database()

    def _auth(self, author_id, role="user"):
        return {"Authorization": f"Bearer {self.signer.mint(author_id, role)}"}

    def _as(self, author_id):
        return self._auth(author_id, "moderator" if author_id == MODERATOR else "user")

    def _database(self):
        """Every row the service writes."""
        with self.app.store.engine.connect() as conn:
            return {table.name: sorted(tuple(map(repr, r)) for r in conn.execute(
                        sa.select(table)).all()) for table in metadata.sorted_tables}

    def _refused(self, before, resp, status, code):
        """``resp`` is the refusal expected, and the database is as it was."""
        assert resp.status_int == status, resp.body
        assert resp.json["code"] == code
        event(f"refused: {resp.request.method} {status} {code}")
        assert self._database() == before, "a refused request changed the database"
        return resp.json

    def _comment_ids(self):
        return sorted(cid for model in self.models.values() for cid in model.comments)

    # -- writes ------------------------------------------------------------

    def _post(self, content, author, body, parent_id=None):
        model = self.models[content]
        now = self.clock.now
        document = {"body": body} if parent_id is None else {"body": body,
                                                             "parent_id": parent_id}
        before = self._database()
        resp = self.client.post_json(f"/contents/{content}/comments", document,
                                     headers=self._as(author), expect_errors=True)
        refusal = model.refusal(author, body, parent_id, moderator=author == MODERATOR, now=now)
        if refusal is not None:
            status, code, headers, extra = refusal
            error = self._refused(before, resp, status, code)
            for name, value in extra.items():
                assert error[name] == value
            assert resp.headers.get("Retry-After") == headers.get("Retry-After")
            if "Retry-After" in headers:
                self.retry = ((content, author, body, parent_id), int(headers["Retry-After"]))
            return
        assert resp.status_int == 201, resp.body
        if author == MODERATOR and model.refusal(author, body, parent_id, moderator=False,
                                                 now=now):
            event("a moderator posted where a user would have been refused")
        comment = resp.json
        model.add(comment, now)
        assert (comment["seq"], comment["body"], comment["author_id"], comment["parent_id"],
                comment["created_at"]) == (model.seq, body, author, parent_id, rfc3339(now))
        if parent_id is None:
            assert comment["parent"] is None
        else:
            parent = model.comments[parent_id]
            assert comment["parent"] == {"id": parent_id, "author_id": parent["author_id"],
                                         "excerpt": parent["body"][:80], "deleted": False}

    @rule(content=st.sampled_from(CONTENTS), author=st.sampled_from((*AUTHORS, MODERATOR)),
          body=BODIES)
    def post(self, content, author, body):
        self._post(content, author, body)

    @precondition(lambda self: self._comment_ids())
    @rule(data=st.data(), author=st.sampled_from((*AUTHORS, MODERATOR)), body=BODIES)
    def reply(self, data, author, body):
        """A reply to any comment: live, a tombstone (409), or, now and
        then, another content's (400)."""
        parent_id = data.draw(st.sampled_from(self._comment_ids()))
        own = next(c for c in CONTENTS if parent_id in self.models[c].comments)
        content = data.draw(st.sampled_from([own, own, own, *CONTENTS]))
        self._post(content, author, body, parent_id)

    @precondition(lambda self: self._comment_ids())
    @rule(data=st.data())
    def repost(self, data):
        """An author posts the body of a comment of theirs again, to its
        content: a duplicate within the window (unless deleted since), and
        slow mode's second post."""
        content = data.draw(st.sampled_from([c for c in CONTENTS if self.models[c].comments]))
        comment = self.models[content].comments[
            data.draw(st.sampled_from(sorted(self.models[content].comments)))]
        self._post(content, comment["author_id"], comment["json"]["body"])

    @precondition(lambda self: self._comment_ids())
    @rule(data=st.data(), who=st.sampled_from(["author", "moderator", "someone else"]))
    def delete(self, data, who):
        content = data.draw(st.sampled_from([c for c in CONTENTS if self.models[c].comments]))
        model = self.models[content]
        # The pinned comment often: deleting it unpins.
        pinned = [] if model.pinned is None else [model.pinned] * 3
        comment_id = data.draw(st.sampled_from([*pinned, *sorted(model.comments)]))
        author = model.comments[comment_id]["author_id"]
        auth = {"author": self._as(author), "moderator": self._auth(MODERATOR, "moderator"),
                "someone else": self._auth(max(AUTHORS) + 1)}[who]
        before = self._database()
        resp = self.client.delete(f"/contents/{content}/comments/{comment_id}", headers=auth,
                                  expect_errors=True)
        if who == "someone else":
            self._refused(before, resp, 403, "forbidden")
            return
        assert resp.status_int == 204
        if model.pinned == comment_id:
            event("deleting the pinned comment")
        model.delete(comment_id, self.clock.now)

    @rule(content=st.sampled_from(CONTENTS), data=st.data(), seconds=BAN_SECONDS,
          retract=st.booleans(), reason=st.sampled_from([None, "spam"]))
    def ban(self, content, data, seconds, retract, reason):
        """A ban, timed or for good, with or without retraction (or the
        moderator banning themself: 400)."""
        posting = sorted({c["author_id"] for c in self.models[content].comments.values()
                          if not c["deleted"]})
        author = data.draw(st.sampled_from([*posting, *AUTHORS, MODERATOR]))
        self._ban(content, author, seconds, retract, reason)

    @precondition(lambda self: any(m.pinned is not None for m in self.models.values()))
    @rule(data=st.data(), seconds=BAN_SECONDS)
    def retract_the_pinned(self, data, seconds):
        """A ban with retraction of the pinned comment's author: the
        tombstones, the unpinning, then the ban."""
        content = data.draw(st.sampled_from(
            [c for c in CONTENTS if self.models[c].pinned is not None]))
        model = self.models[content]
        self._ban(content, model.comments[model.pinned]["author_id"], seconds, True, "spam")

    def _ban(self, content, author, seconds, retract, reason):
        model = self.models[content]
        before = self._database()
        resp = self.client.post_json(
            f"/contents/{content}/bans",
            {"author_id": author, "seconds": seconds, "retract": retract, "reason": reason},
            headers=self._auth(MODERATOR, "moderator"), expect_errors=True)
        if author == MODERATOR:
            self._refused(before, resp, 400, "invalid_request")
            return
        assert resp.status_int == 201, resp.body
        was_pinned = model.pinned
        assert resp.json == model.ban(author, seconds, retract, reason, self.clock.now)
        if resp.json["retracted"]:
            event("a ban retracted comments" + (", the pinned one" * (model.pinned != was_pinned)))
        assert resp.headers["Location"] == f"/contents/{content}/bans/{author}"

    @rule(content=st.sampled_from(CONTENTS), author=st.sampled_from(AUTHORS))
    def lift_ban(self, content, author):
        model = self.models[content]
        before = self._database()
        resp = self.client.delete(f"/contents/{content}/bans/{author}",
                                  headers=self._auth(MODERATOR, "moderator"),
                                  expect_errors=True)
        if not model.lift(author, self.clock.now):
            self._refused(before, resp, 404, "not_found")
            return
        assert resp.status_int == 204

    def _patch(self, content, document):
        model = self.models[content]
        before = self._database()
        resp = self.client.patch_json(f"/contents/{content}/room", document,
                                      headers=self._auth(MODERATOR, "moderator"),
                                      expect_errors=True)
        changed = model.patch(document, self.clock.now)
        if changed == "refused":
            self._refused(before, resp, 400, "invalid_request")
            return
        assert resp.status_int == 200, resp.body
        assert resp.json == model.room_json()
        if not changed:
            assert self._database() == before, "a PATCH that changed nothing wrote"

    @rule(content=st.sampled_from(CONTENTS), seconds=SLOW_MODE_SECONDS)
    def slow_mode(self, content, seconds):
        self._patch(content, {"slow_mode_seconds": seconds})

    @rule(content=st.sampled_from(CONTENTS), closed=st.booleans())
    def close_or_reopen(self, content, closed):
        self._patch(content, {"closed": closed})

    @rule(content=st.sampled_from(CONTENTS), data=st.data())
    def pin(self, content, data):
        """Pin any comment (a live one of the content; a tombstone, another
        content's or none at all: 400) or unpin."""
        ids = self._comment_ids()
        live = [cid for cid, c in self.models[content].comments.items() if not c["deleted"]]
        choices = [None, max(ids, default=0) + 1000, *ids, *live, *live]
        self._patch(content, {"pinned_comment_id": data.draw(st.sampled_from(choices))})

    @rule(content=st.sampled_from(CONTENTS), data=st.data())
    def patch_room(self, content, data):
        """Several fields at once: a refused pin changes none of them."""
        ids = self._comment_ids()
        fields = {"slow_mode_seconds": SLOW_MODE_SECONDS, "closed": st.booleans(),
                  "pinned_comment_id": st.sampled_from([None, max(ids, default=0) + 1000, *ids])}
        names = data.draw(st.sets(st.sampled_from(sorted(fields)), min_size=2))
        self._patch(content, {name: data.draw(fields[name]) for name in sorted(names)})

    @precondition(lambda self: self.retry is not None)
    @rule()
    def retry_after(self):
        """The client's rule: after a 429 (slow mode) or a timed ban's 403,
        wait exactly ``Retry-After`` seconds and post again — enough,
        unless something else changed meanwhile."""
        post, seconds = self.retry
        self.retry = None
        self.clock.now += timedelta(seconds=seconds)
        self._post(*post)

    @rule(seconds=TICKS)
    def tick(self, seconds):
        self.clock.now += timedelta(seconds=seconds)

    # -- reads -------------------------------------------------------------

    def _read(self, content, **params):
        page = self.client.get(f"/contents/{content}/comments", params=params).json
        model = self.models[content]
        assert room_view(page["room"]) == model.room_view()
        assert page["poll_after_ms"] == (CLOSED_POLL_AFTER_MS if model.closed else 0)
        return page

    def _catch_up(self, content, since, limit):
        """A page after ``since``: the model's next changes, but for room
        events a newer one replaced, which it may leave out."""
        page = self._read(content, since=since, limit=limit, wait=0)
        model = self.models[content]
        assert page["reset"] is False
        got = seen(page)
        expected = [change for change in model.changes() if change[0] > since]
        replaced = model.replaced_room_events()
        at = 0
        for seq, change in expected:
            if at < len(got) and got[at][0] == seq:
                assert got[at][1] == change
                at += 1
            elif seq not in replaced:
                assert at == len(got) == limit, f"seq {seq} left out of {got}"
                break
        assert at == len(got), f"changes the model lacks: {got[at:]}"
        assert page["cursor"] == (got[-1][0] if got else since)
        return page

    @rule(content=st.sampled_from(CONTENTS), data=st.data(),
          read=st.sampled_from(["poll", "latest", "walk"]),
          limit=st.integers(min_value=1, max_value=6))
    def read(self, content, data, read, limit):
        """A page after a random cursor (behind, at or ahead of the
        content), the latest page, or the whole feed ``limit`` at a time."""
        model = self.models[content]
        if read == "walk":
            self._walk(content, limit)
        elif read == "latest":
            page = self._read(content, limit=limit)
            assert page["events"] == [] and page["reset"] is False
            assert [r for _, r in seen(page)] == model.latest(limit)
            assert page["cursor"] == model.seq
        else:
            since = data.draw(st.integers(min_value=0, max_value=model.seq + 2))
            if since <= model.seq:
                self._catch_up(content, since, limit)
                return
            # Ahead of the database: start over.
            page = self._read(content, since=since, limit=limit, wait=0)
            assert page["reset"] is True and page["cursor"] == model.seq
            assert page["events"] == []
            assert [r for _, r in seen(page)] == model.latest(limit)

    def _walk(self, content, limit):
        cursor = 0
        while True:
            page = self._catch_up(content, cursor, limit)
            if page["cursor"] == cursor:
                break
            cursor = page["cursor"]
        assert cursor == self.models[content].seq

    def _apply(self, content, cursor, view, page):
        for seq, change in seen(page):
            assert seq > cursor, "a change was delivered twice"
            if isinstance(change, tuple):
                cid, _, _, deleted, body, _, _ = change
                if deleted:
                    view.pop(cid, None)
                else:
                    view[cid] = body
        self.followers[content] = (page["cursor"], view)

    @rule(content=st.sampled_from(CONTENTS), limit=st.integers(min_value=1, max_value=4))
    def follow(self, content, limit):
        """A follower reads one page from its cursor (after any gap)."""
        cursor, view = self.followers.get(content, (0, {}))
        page = self._read(content, since=cursor, limit=limit, wait=0)
        self._apply(content, cursor, view, page)

    @rule(content=st.sampled_from(CONTENTS))
    def reconnect(self, content):
        """A follower that lost its connection resumes from its cursor: its
        view then catches up completely."""
        cursor, view = self.followers.get(content, (0, {}))
        while True:
            page = self._read(content, since=cursor, wait=0)
            self._apply(content, cursor, view, page)
            if page["cursor"] == cursor:
                break
            cursor = page["cursor"]
        assert view == self.models[content].live()

    @rule()
    def restart(self):
        self.app.close()
        self._start_app()

    # -- invariants --------------------------------------------------------

    @invariant()
    def the_feed_is_the_model(self):
        """From cursor 0 to the end: every change, in seq order, and the
        room; the room and the bans in force as their routes read them."""
        if self.app is None:
            return
        now = self.clock.now
        for content in CONTENTS:
            model = self.models[content]
            self._walk(content, WALK_LIMIT)
            assert self.client.get(f"/contents/{content}/room").json == model.room_json()
            listed = self.client.get(f"/contents/{content}/bans",
                                     headers=self._auth(MODERATOR, "moderator")).json
            assert [(b["author_id"], b["until"]) for b in listed["bans"]] == [
                (author, rfc3339(until)) for author, until in sorted(model.bans.items())
                if model.banned_until(author, now)[0]]

    @invariant()
    def followers_never_run_ahead(self):
        for content, (cursor, _) in self.followers.items():
            assert cursor <= self.models[content].seq


class OnPostgres:
    """A machine's database on PostgreSQL: a schema of its own per run."""

    def _make_database(self):
        self.schema = f"lc_model_{uuid.uuid4().hex[:12]}"
        with _admin().begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {self.schema}")
        return with_search_path(PG_URL, self.schema)

    def _drop_database(self):
        with _admin().begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {self.schema} CASCADE")


class PostgresFeedMachine(OnPostgres, FeedMachine):
    """The same machine on PostgreSQL, where a post without a key or a
    parent takes the quick path: its checks and insert sent on the
    driver's cursor, not the transaction SQLite's take."""


_admins = []


def _admin():
    """One engine for every run's CREATE and DROP SCHEMA."""
    if not _admins:
        _admins.append(sa.create_engine(PG_URL, pool_size=1))
    return _admins[0]


def machine_settings(examples):
    return settings(
        max_examples=examples, stateful_step_count=30, deadline=None, derandomize=IN_CI,
        database=None if IN_CI else settings.default.database,
        suppress_health_check=[HealthCheck.too_slow],
    )


FeedMachine.TestCase.settings = machine_settings(EXAMPLES)
TestFeedAgainstModel = FeedMachine.TestCase
PostgresFeedMachine.TestCase.settings = machine_settings(PG_EXAMPLES)


@pytest.mark.postgres
class TestFeedAgainstModelOnPostgres(PostgresFeedMachine.TestCase):
    def setUp(self):
        require_postgres()
