"""The read of several feeds (``GET /comments?feeds=…``) against the
single-feed reads: a hypothesis state machine posts to and deletes from a
few contents, closes and reopens them, and reads several feeds at once
with random cursors (bare, behind, at, ahead of the content, or so far
behind that the feed starts over), limits and spellings, with ``wait=0``.

Every answer must be, feed by feed, exactly what the single read of that
feed answers at the same moment (``GET /contents/{id}/comments?since=…``,
or its latest page for a bare content, a reset and a cursor ahead): every
named content listed, once, in ascending order; a reset for the feeds and
only the feeds whose cursor the reset rule rejects; the pause asked the
least any feed asks, so a closed feed never slows the others. A list in
another order is sent (307) to the canonical one.

Followers of a few contents each walk their cursors from the answers alone
(no other state): each gets every change (comment, tombstone, room event
but one a newer one replaced) of every content it follows exactly once, in
seq order per content. The machine runs on SQLite and, fewer times, on
PostgreSQL; CI draws the same runs every time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from urllib.parse import parse_qs, urlsplit

import pytest
import webtest
from conftest import (
    SECRET,
    make_settings,
    notify_channel_for,
    require_postgres,
)
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from test_model import OnPostgres, machine_settings

from service.app import create_app
from service.db.store import Store, create_engine
from service.web.auth import TokenSigner

CONTENTS = (1, 2, 3, 4)
AUTHORS = (1, 2)
MODERATOR = 99
#: A feed more than this many changes behind starts over (small, so that
#: the machine meets it).
RESET_AFTER = 6
CLOSED_POLL_AFTER_MS = 300_000
#: The followers: which contents each follows, and which it first names
#: bare (its latest page, then every change after it).
FOLLOWERS = (((1, 2), ()), ((1, 3, 4), (3,)), ((1, 2, 3, 4), (2, 4)))
#: Examples (runs of the machine) per test run, as test_model's knobs say:
#: CI draws the same ones every run (derandomized).
EXAMPLES = int(os.environ.get("LIVECOMMENTS_MODEL_EXAMPLES", 100))
PG_EXAMPLES = max(1, int(os.environ.get("LIVECOMMENTS_MODEL_PG_EXAMPLES", 30)) // 2)
LIMITS = st.one_of(st.none(), st.integers(min_value=1, max_value=5))


class Content:
    """What one content holds: comments (at their seq, or moved on as a
    tombstone) and room events, each at a seq of its own."""

    def __init__(self):
        self.seq = 0
        self.comments = {}  # id -> (seq, deleted)
        self.posted_at = {}  # id -> the seq it was posted at
        self.rooms = []  # seqs of room events, ascending
        self.closed = False

    def changes(self):
        """{seq: (kind, id or None, deleted)} of every change there is."""
        found = {seq: ("comment", cid, deleted) for cid, (seq, deleted) in self.comments.items()}
        found.update({seq: ("room", None, False) for seq in self.rooms})
        return found

    def live(self):
        return sorted(cid for cid, (_, deleted) in self.comments.items() if not deleted)


def changes_of(page):
    """A page's changes as [(seq, (kind, id or None, deleted))] by seq."""
    found = [(c["seq"], ("comment", c["id"], c["deleted"])) for c in page["comments"]]
    found += [(e["seq"], (e["type"], None, False)) for e in page["events"]]
    return sorted(found)


class Follower:
    """A client following several contents from its answers alone."""

    def __init__(self, contents, bare):
        self.cursors = {c: (None if c in bare else 0) for c in contents}
        self.start = {c: 0 for c in contents}  # where each content's record begins
        self.got = {c: [] for c in contents}  # [(seq, change)] as received

    def feeds(self):
        return ",".join(str(c) if s is None else f"{c}:{s}" for c, s in self.cursors.items())


class ManyFeedsMachine(RuleBasedStateMachine):
    """The machine on SQLite (a file of its own per run)."""

    def __init__(self):
        super().__init__()
        self.url = self._make_database()
        self.signer = TokenSigner(SECRET)
        self.contents = {c: Content() for c in CONTENTS}
        self.followers = [Follower(contents, bare) for contents, bare in FOLLOWERS]
        store = Store(create_engine(self.url, pool_size=5),
                      notify_channel=notify_channel_for(self.url))
        if not store.has_schema():
            store.create_schema()
        # A small window, so catch-up reads below it go to the store.
        self.app = create_app(
            make_settings(self.url, feed_window=3, poll_interval=0.2, reset_after=RESET_AFTER,
                          busy_pace_ms=0,  # pacing: tests/test_pacing.py
                          closed_poll_after_ms=CLOSED_POLL_AFTER_MS, duplicate_window=0),
            store=store)
        self.client = webtest.TestApp(self.app)

    def _make_database(self):
        self.workdir = tempfile.mkdtemp(prefix="livecomments-feeds-model-")
        return f"sqlite:///{self.workdir}/model.db"

    def _drop_database(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def teardown(self):
        self.app.close()
        self._drop_database()

    def _auth(self, author_id, role="user"):
        return {"Authorization": f"Bearer {self.signer.mint(author_id, role)}"}

    # -- writes ------------------------------------------------------------

    @rule(content=st.sampled_from(CONTENTS), author=st.sampled_from(AUTHORS),
          count=st.integers(min_value=1, max_value=4))
    def post(self, content, author, count):
        model = self.contents[content]
        for _ in range(count):
            resp = self.client.post_json(f"/contents/{content}/comments",
                                         {"body": f"comment {model.seq + 1}"},
                                         headers=self._auth(author), expect_errors=True)
            if model.closed:
                assert resp.status_int == 409 and resp.json["code"] == "closed"
                return
            assert resp.status_int == 201, resp.body
            model.seq += 1
            assert resp.json["seq"] == model.seq
            model.comments[resp.json["id"]] = (model.seq, False)
            model.posted_at[resp.json["id"]] = model.seq

    @precondition(lambda self: any(m.live() for m in self.contents.values()))
    @rule(data=st.data())
    def delete(self, data):
        content = data.draw(st.sampled_from([c for c in CONTENTS if self.contents[c].live()]))
        model = self.contents[content]
        comment_id = data.draw(st.sampled_from(model.live()))
        self.client.delete(f"/contents/{content}/comments/{comment_id}",
                           headers=self._auth(MODERATOR, "moderator"), status=204)
        model.seq += 1
        model.comments[comment_id] = (model.seq, True)

    @rule(content=st.sampled_from(CONTENTS))
    def close_or_reopen(self, content):
        model = self.contents[content]
        self.client.patch_json(f"/contents/{content}/room", {"closed": not model.closed},
                               headers=self._auth(MODERATOR, "moderator"), status=200)
        model.closed = not model.closed
        model.seq += 1
        model.rooms.append(model.seq)

    # -- reads -------------------------------------------------------------

    def _expected_reset(self, content, since):
        seq = self.contents[content].seq
        return since is not None and (since > seq or seq - since > RESET_AFTER)

    def _single(self, content, since, limit):
        """The single read of one feed, as a viewer of that one content asks."""
        params = {} if limit is None else {"limit": limit}
        if since is not None:
            params.update(since=since, wait=0)
        return self.client.get(f"/contents/{content}/comments", params=params).json

    def _many(self, cursors, limit):
        """``GET /comments?feeds=…`` at ``cursors`` {content: since or
        None}, ascending, checked feed by feed against the single reads."""
        feeds = ",".join(str(c) if s is None else f"{c}:{s}" for c, s in cursors.items())
        params = {"feeds": feeds, "wait": 0}
        if limit is not None:
            params["limit"] = limit
        answer = self.client.get("/comments", params=params).json
        pages = answer["feeds"]
        assert [page["content_id"] for page in pages] == list(cursors), "not every feed, in order"
        for page, (content, since) in zip(pages, cursors.items(), strict=True):
            single = self._single(content, since, limit)
            assert page == single, (content, since, limit)
            model = self.contents[content]
            reset = self._expected_reset(content, since)
            assert page["reset"] is reset, (content, since, model.seq)
            if since is None or reset:
                live = [cid for cid, _ in sorted(model.comments.items(), key=lambda i: i[1])
                        if not model.comments[cid][1]]
                assert [c["id"] for c in page["comments"]] == live[-(limit or 50):]
                assert page["cursor"] == model.seq
            else:
                changes = changes_of(page)
                assert all(seq > since for seq, _ in changes)
                assert page["cursor"] == (changes[-1][0] if changes else since)
                if not changes:  # nothing new: that feed's cursor unchanged
                    assert since == model.seq, (since, model.seq)
            assert page["poll_after_ms"] == (CLOSED_POLL_AFTER_MS if model.closed else 0)
        # A closed feed's long pause never slows the others.
        assert answer["poll_after_ms"] == min(page["poll_after_ms"] for page in pages)
        if any(page["reset"] for page in pages):
            event("a multi read with a reset")
        if len({page["poll_after_ms"] for page in pages}) > 1:
            event("a multi read of closed and open feeds")
        return pages

    @rule(data=st.data(), limit=LIMITS, shuffle=st.booleans())
    def read(self, data, limit, shuffle):
        """Several feeds at random cursors: bare, anywhere behind (far
        behind: reset), at, or ahead (reset)."""
        chosen = sorted(data.draw(st.sets(st.sampled_from(CONTENTS), min_size=1)))
        cursors = {}
        for content in chosen:
            seq = self.contents[content].seq
            cursors[content] = data.draw(st.one_of(
                st.none(), st.integers(min_value=0, max_value=seq),
                st.just(seq), st.integers(min_value=seq + 1, max_value=seq + 3)))
        if shuffle and len(chosen) > 1:
            listed = data.draw(st.permutations(chosen))
            if listed != chosen:
                self._redirected(listed, cursors)
        self._many(cursors, limit)

    def _redirected(self, listed, cursors):
        """A list in another order: 307 to the canonical list."""
        feeds = ",".join(str(c) if cursors[c] is None else f"{c}:{cursors[c]}" for c in listed)
        resp = self.client.get(f"/comments?feeds={feeds}&wait=0", status=307)
        query = parse_qs(urlsplit(resp.headers["Location"]).query)
        canonical = ",".join(str(c) if s is None else f"{c}:{s}" for c, s in cursors.items())
        assert query == {"feeds": [canonical], "wait": ["0"]}
        event("redirected to the canonical list")

    @rule(follower=st.sampled_from(range(len(FOLLOWERS))), limit=LIMITS)
    def follow(self, follower, limit):
        """A follower reads its feeds once, from the cursors of its last answer."""
        self._follow(self.followers[follower], limit)

    def _follow(self, follower, limit):
        pages = self._many(dict(follower.cursors), limit)
        moved = False
        for page in pages:
            content = page["content_id"]
            since = follower.cursors[content]
            if since is None or page["reset"]:
                # Its latest page: the record begins after it.
                follower.start[content] = page["cursor"]
                follower.got[content] = []
                if page["reset"]:
                    event("a follower fell too far behind and started over")
            else:
                for seq, change in changes_of(page):
                    assert seq > since, "a change delivered twice"
                    follower.got[content].append((seq, change))
            moved |= page["cursor"] != since
            follower.cursors[content] = page["cursor"]
        return moved

    @rule(follower=st.sampled_from(range(len(FOLLOWERS))), limit=LIMITS)
    def catch_up(self, follower, limit):
        """A follower reads until nothing is new: it has every change of
        every content it follows since its record began, once, in order."""
        follower = self.followers[follower]
        while self._follow(follower, limit):
            pass
        for content, got in follower.got.items():
            self._check_record(content, follower.start[content], got)
            assert follower.cursors[content] == self.contents[content].seq

    def _check_record(self, content, start, got):
        model = self.contents[content]
        seqs = [seq for seq, _ in got]
        assert seqs == sorted(set(seqs)), f"out of order or twice: {seqs}"
        received = dict(got)
        expected = {seq: change for seq, change in model.changes().items() if seq > start}
        newest_room = max(model.rooms, default=None)
        for seq, change in expected.items():
            if seq not in received:
                # Only a room event a newer one replaced may be left out.
                assert change[0] == "room" and seq != newest_room, f"seq {seq} {change} lost"
                event("a replaced room event left out")
        for seq, change in received.items():
            if seq in expected:
                assert expected[seq] == change, (seq, change, expected[seq])
            else:
                # A comment received live, later deleted (a tombstone at a
                # newer seq now): at the seq it was posted with.
                kind, cid, deleted = change
                assert kind == "comment" and not deleted, (seq, change)
                assert model.posted_at[cid] == seq and model.comments[cid][1], (seq, change)

    # -- invariants --------------------------------------------------------

    @invariant()
    def followers_never_run_ahead(self):
        for follower in self.followers:
            for content, cursor in follower.cursors.items():
                assert cursor is None or cursor <= self.contents[content].seq


class PostgresManyFeedsMachine(OnPostgres, ManyFeedsMachine):
    """The same machine on PostgreSQL (a schema of its own per run)."""


ManyFeedsMachine.TestCase.settings = machine_settings(EXAMPLES)
TestManyFeedsAgainstSingleReads = ManyFeedsMachine.TestCase
PostgresManyFeedsMachine.TestCase.settings = machine_settings(PG_EXAMPLES)


@pytest.mark.postgres
class TestManyFeedsAgainstSingleReadsOnPostgres(PostgresManyFeedsMachine.TestCase):
    def setUp(self):
        require_postgres()
