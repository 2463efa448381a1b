"""The feed against a model: a hypothesis state machine posts, deletes,
polls with random cursors and limits, reconnects followers and restarts
the app, and checks every answer against a plain in-memory model.

The model is the contract in a few lines: every change takes the content's
next seq; a deletion moves the comment to a new seq as a tombstone; a
read after cursor C returns the changes with seq above C in order, at
most ``limit``; the latest page is the newest live comments. A follower
that applies what it reads ends up with exactly the live comments. A
reply names a live comment of its content (a deleted one is refused with
409, storing nothing) and quotes it; every comment read says its parent.
"""

from __future__ import annotations

import shutil
import tempfile

import webtest
from conftest import SECRET, make_settings
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from service.app import create_app
from service.web.auth import TokenSigner

CONTENTS = (1, 2)
AUTHORS = (1, 2, 3)
MODERATOR = 99
BODIES = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
    max_size=30,
).filter(lambda body: body.strip())


class Model:
    """What the contract promises, for one content."""

    def __init__(self):
        self.seq = 0
        self.comments = {}  # id -> {"seq", "author_id", "body", "deleted", "parent_id"}

    def add(self, comment_id, author_id, body, parent_id=None):
        self.seq += 1
        self.comments[comment_id] = {"seq": self.seq, "author_id": author_id, "body": body,
                                     "deleted": False, "parent_id": parent_id}

    def delete(self, comment_id):
        if not self.comments[comment_id]["deleted"]:
            self.seq += 1
            self.comments[comment_id].update(seq=self.seq, body=None, deleted=True)

    def changes_after(self, since, limit):
        ordered = sorted(self.comments.items(), key=lambda item: item[1]["seq"])
        return [(cid, c["seq"], c["deleted"], c["body"], c["parent_id"]) for cid, c in ordered
                if c["seq"] > since][:limit]

    def latest(self, limit):
        live = [(cid, c) for cid, c in self.comments.items() if not c["deleted"]]
        live.sort(key=lambda item: item[1]["seq"])
        return [(cid, c["seq"], False, c["body"], c["parent_id"]) for cid, c in live[-limit:]]

    def live(self):
        return {cid: c["body"] for cid, c in self.comments.items() if not c["deleted"]}


def seen(page):
    for c in page["comments"]:
        summary = c["parent"]
        assert (summary is None) == (c["parent_id"] is None)
        if summary is not None:  # as posted, or scrubbed once the parent is deleted
            assert summary["id"] == c["parent_id"]
            assert (summary["excerpt"] is None) == summary["deleted"]
    return [(c["id"], c["seq"], c["deleted"], c["body"], c["parent_id"])
            for c in page["comments"]]


class FeedMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.workdir = tempfile.mkdtemp(prefix="livecomments-model-")
        self.url = f"sqlite:///{self.workdir}/model.db"
        self.signer = TokenSigner(SECRET)
        self.models = {content: Model() for content in CONTENTS}
        self.followers = {}  # content -> (cursor, {id: body})
        self.app = None

    @initialize()
    def start(self):
        self._start_app()

    def _start_app(self):
        # A small window, so catch-up reads below it go to the store.
        self.app = create_app(make_settings(self.url, feed_window=3, poll_interval=0.2))
        self.client = webtest.TestApp(self.app)

    def teardown(self):
        if self.app is not None:
            self.app.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _auth(self, author_id, role="user"):
        return {"Authorization": f"Bearer {self.signer.mint(author_id, role)}"}

    @rule(content=st.sampled_from(CONTENTS), author=st.sampled_from(AUTHORS), body=BODIES)
    def post(self, content, author, body):
        resp = self.client.post_json(f"/contents/{content}/comments", {"body": body},
                                     headers=self._auth(author))
        assert resp.status_int == 201
        comment = resp.json
        model = self.models[content]
        model.add(comment["id"], author, body)
        assert (comment["seq"], comment["body"], comment["author_id"]) == (model.seq, body, author)

    @precondition(lambda self: any(m.comments for m in self.models.values()))
    @rule(data=st.data(), author=st.sampled_from(AUTHORS), body=BODIES)
    def reply(self, data, author, body):
        content = data.draw(st.sampled_from([c for c in CONTENTS if self.models[c].comments]))
        model = self.models[content]
        parent_id = data.draw(st.sampled_from(sorted(model.comments)))
        parent = model.comments[parent_id]
        resp = self.client.post_json(f"/contents/{content}/comments",
                                     {"body": body, "parent_id": parent_id},
                                     headers=self._auth(author), expect_errors=True)
        if parent["deleted"]:
            assert resp.status_int == 409
            return
        assert resp.status_int == 201
        model.add(resp.json["id"], author, body, parent_id)
        assert resp.json["seq"] == model.seq
        assert resp.json["parent"] == {"id": parent_id, "author_id": parent["author_id"],
                                       "excerpt": parent["body"][:80], "deleted": False}

    @precondition(lambda self: any(m.comments for m in self.models.values()))
    @rule(data=st.data(), as_moderator=st.booleans())
    def delete(self, data, as_moderator):
        content = data.draw(st.sampled_from([c for c in CONTENTS if self.models[c].comments]))
        model = self.models[content]
        comment_id = data.draw(st.sampled_from(sorted(model.comments)))
        author = model.comments[comment_id]["author_id"]
        auth = self._auth(MODERATOR, "moderator") if as_moderator else self._auth(author)
        resp = self.client.delete(f"/contents/{content}/comments/{comment_id}", headers=auth)
        assert resp.status_int == 204
        model.delete(comment_id)

    @rule(content=st.sampled_from(CONTENTS), data=st.data(),
          limit=st.integers(min_value=1, max_value=6))
    def poll(self, content, data, limit):
        model = self.models[content]
        since = data.draw(st.integers(min_value=0, max_value=model.seq + 2))
        page = self.client.get(f"/contents/{content}/comments",
                               params={"since": since, "limit": limit, "wait": 0}).json
        if since > model.seq:  # ahead of the database: start over
            assert page["reset"] is True and page["cursor"] == model.seq
            assert seen(page) == model.latest(limit)
            return
        expected = model.changes_after(since, limit)
        assert page["reset"] is False
        assert seen(page) == expected
        assert page["cursor"] == (expected[-1][1] if expected else since)

    @rule(content=st.sampled_from(CONTENTS), limit=st.integers(min_value=1, max_value=6))
    def latest(self, content, limit):
        page = self.client.get(f"/contents/{content}/comments", params={"limit": limit}).json
        model = self.models[content]
        assert seen(page) == model.latest(limit) and page["cursor"] == model.seq

    @rule(content=st.sampled_from(CONTENTS), limit=st.integers(min_value=1, max_value=4))
    def follow(self, content, limit):
        """A follower reads one page from its cursor (after any gap)."""
        cursor, view = self.followers.get(content, (0, {}))
        page = self.client.get(f"/contents/{content}/comments",
                               params={"since": cursor, "limit": limit, "wait": 0}).json
        for cid, seq, deleted, body, _ in seen(page):
            assert seq > cursor, "a change was delivered twice"
            if deleted:
                view.pop(cid, None)
            else:
                view[cid] = body
        self.followers[content] = (page["cursor"], view)

    @rule(content=st.sampled_from(CONTENTS))
    def reconnect(self, content):
        """A follower that lost its connection resumes from its cursor: its
        view then catches up completely."""
        cursor, view = self.followers.get(content, (0, {}))
        while True:
            page = self.client.get(f"/contents/{content}/comments",
                                   params={"since": cursor, "wait": 0}).json
            for cid, _, deleted, body, _ in seen(page):
                if deleted:
                    view.pop(cid, None)
                else:
                    view[cid] = body
            if page["cursor"] == cursor:
                break
            cursor = page["cursor"]
        self.followers[content] = (cursor, view)
        assert view == self.models[content].live()

    @rule()
    def restart(self):
        self.app.close()
        self._start_app()

    @invariant()
    def followers_never_run_ahead(self):
        for content, (cursor, _) in self.followers.items():
            assert cursor <= self.models[content].seq


FeedMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFeedAgainstModel = FeedMachine.TestCase
