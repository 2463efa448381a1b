"""The HTTP contract (docs/api.md) through WebTest, on SQLite and PostgreSQL.

GETs whose ``since`` may equal the newest seq pass ``wait=0`` when they
expect an immediate answer: such a request is otherwise held for ``wait``
seconds. A content's feed is served from memory once it has a viewer and
catches up with writes through its poller, so a test that writes after a
viewer has read follows cursors with a hold (:func:`follow`), as a client
would, instead of expecting the very next short poll to show the write.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

import pytest
import webtest
from bad_requests import BAD_REQUESTS, JSON, assert_error_document, db_state, headers_for

FIELDS = {"id", "content_id", "author_id", "body", "created_at", "seq", "deleted",
          "parent_id", "parent"}
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


# -- helpers -------------------------------------------------------------------


def post(client, content_id, body, auth, **kwargs):
    return client.post_json(
        f"/contents/{content_id}/comments", {"body": body}, headers={"Authorization": auth},
        **kwargs,
    )


def posted(client, content_id, body, auth):
    resp = post(client, content_id, body, auth)
    assert resp.status_int == 201, resp.body
    return resp.json


def feed(client, content_id, **params):
    resp = client.get(f"/contents/{content_id}/comments", params=params)
    assert resp.status_int == 200
    return resp.json


def follow(client, content_id, since, until_seq, *, limit=50, timeout=5.0):
    """What a reader following cursors from ``since`` sees, up to ``until_seq``."""
    seen, cursor = [], since
    deadline = time.monotonic() + timeout
    while cursor < until_seq:
        assert time.monotonic() < deadline, f"feed stuck at {cursor}, expected {until_seq}"
        page = feed(client, content_id, since=cursor, limit=limit, wait=2)
        assert page["cursor"] >= cursor
        seen.extend(page["comments"])
        cursor = page["cursor"]
    return seen, cursor


def assert_error(resp, status, code):
    return assert_error_document(
        resp.status_int, resp.headers.get("Content-Type"), resp.body, status,
        where=f"{resp.request.method} {resp.request.path_qs}", code=code,
    )


# -- POST ------------------------------------------------------------------------


def test_post_returns_the_comment_with_location(client, token):
    before = datetime.now(UTC)
    resp = post(client, 5, "first!", token(7))
    assert resp.status_int == 201
    assert resp.content_type == JSON
    comment = resp.json
    assert set(comment) == FIELDS
    assert type(comment["id"]) is int and comment["id"] >= 1
    assert comment["content_id"] == 5
    assert comment["author_id"] == 7
    assert comment["body"] == "first!"
    assert comment["seq"] == 1
    assert comment["deleted"] is False
    assert RFC3339_UTC.fullmatch(comment["created_at"]), comment["created_at"]
    created = datetime.fromisoformat(comment["created_at"].replace("Z", "+00:00"))
    assert before.replace(microsecond=0) <= created <= datetime.now(UTC)
    assert resp.headers["Location"].endswith(f"/contents/5/comments/{comment['id']}")

    second = posted(client, 5, "second", token(8))
    assert second["seq"] == 2 and second["id"] != comment["id"]
    assert second["author_id"] == 8
    # Each content has its own sequence.
    assert posted(client, 6, "elsewhere", token(7))["seq"] == 1


def test_author_comes_from_the_token_only(client, token, app):
    resp = client.post_json(
        "/contents/1/comments", {"body": "hi", "author_id": 2},
        headers={"Authorization": token(1)}, expect_errors=True,
    )
    assert_error(resp, 400, "invalid_request")
    assert db_state(app) == ([], [])
    assert posted(client, 1, "hi", token(3))["author_id"] == 3
    assert [c["author_id"] for c in feed(client, 1)["comments"]] == [3]


BODIES = [
    "plain ascii",
    "Grüße, ça va? ñandú — “quotes” ‘single’",
    "日本語のコメント、한국어, العربية, עברית",
    "emoji 🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "line one\nline two\r\nline three\ttabbed",
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)> &amp; &lt;b&gt; \"double\" 'single' \\backslash\\",
    "  leading and trailing spaces  ",
    "\u200b zero width, \u00a0 nbsp, combining e\u0301",
    "a" * 2000,
    "é" * 2000,
]


def test_bodies_round_trip_verbatim(client, token):
    sent = [posted(client, 1, body, token(1)) for body in BODIES]
    assert [c["body"] for c in sent] == BODIES
    page = feed(client, 1, limit=200)
    assert [c["body"] for c in page["comments"]] == BODIES
    assert page["comments"] == sent
    changes = feed(client, 1, since=0, wait=0, limit=200)["comments"]
    assert [c["body"] for c in changes] == BODIES
    query = client.get("/comments", params={"content_id": 1, "limit": 200}).json
    assert [c["body"] for c in query["comments"]] == BODIES


def test_body_length_limit_is_2000_characters(client, token, app):
    assert post(client, 1, "x" * 2000, token(1)).status_int == 201
    state = db_state(app)
    assert_error(post(client, 1, "x" * 2001, token(1), expect_errors=True), 400, "invalid_request")
    assert_error(post(client, 1, "é" * 2001, token(1), expect_errors=True), 400, "invalid_request")
    assert db_state(app) == state


def test_configured_body_length_limit(make_app, token):
    client = webtest.TestApp(make_app(max_comment_chars=10))
    assert post(client, 1, "x" * 10, token(1)).status_int == 201
    assert_error(post(client, 1, "x" * 11, token(1), expect_errors=True), 400, "invalid_request")


# -- GET ---------------------------------------------------------------------------


def test_latest_page_without_since(client, token):
    ids = [posted(client, 1, f"c{i}", token(1))["id"] for i in range(1, 6)]
    posted(client, 2, "other content", token(1))
    client.delete(f"/contents/1/comments/{ids[2]}", headers={"Authorization": token(1)})

    resp = client.get("/contents/1/comments", params={"limit": 3})
    page = resp.json
    assert set(page) >= {"content_id", "comments", "cursor", "poll_after_ms"}
    assert page["content_id"] == 1
    assert [c["body"] for c in page["comments"]] == ["c2", "c4", "c5"]
    seqs = [c["seq"] for c in page["comments"]]
    assert seqs == sorted(seqs)
    assert all(c["deleted"] is False for c in page["comments"])
    assert page["cursor"] == 6  # five comments and one deletion
    assert page["poll_after_ms"] == 0
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.content_type == JSON
    assert int(resp.headers["Content-Length"]) == len(resp.body)
    assert "Transfer-Encoding" not in resp.headers

    everything = feed(client, 1)["comments"]
    assert [c["body"] for c in everything] == ["c1", "c2", "c4", "c5"]


def test_default_limit_is_50(client, token):
    for i in range(55):
        posted(client, 1, f"c{i}", token(1))
    page = feed(client, 1)
    assert [c["body"] for c in page["comments"]] == [f"c{i}" for i in range(5, 55)]
    assert page["cursor"] == 55
    changes = feed(client, 1, since=0, wait=0)
    assert [c["seq"] for c in changes["comments"]] == list(range(1, 51))
    assert changes["cursor"] == 50
    assert len(feed(client, 1, limit=200)["comments"]) == 55


def test_empty_content(client):
    page = feed(client, 404)
    assert page["comments"] == [] and page["cursor"] == 0 and page["content_id"] == 404
    assert feed(client, 404, since=0, wait=0)["comments"] == []


def test_since_older_than_newest_returns_changes_after_it(client, token):
    for i in range(1, 6):
        posted(client, 1, f"c{i}", token(1))
    page = feed(client, 1, since=2, limit=2, wait=0)
    assert [c["seq"] for c in page["comments"]] == [3, 4]
    assert [c["body"] for c in page["comments"]] == ["c3", "c4"]
    assert page["cursor"] == 4
    page = feed(client, 1, since=2, wait=0)
    assert [c["seq"] for c in page["comments"]] == [3, 4, 5]
    assert page["cursor"] == 5


def test_since_at_newest_with_wait_0_answers_empty_at_once(client, token):
    posted(client, 1, "only", token(1))
    page = feed(client, 1, since=1, wait=0)
    assert page["comments"] == [] and page["cursor"] == 1
    answers = client.app.hub.status()["answers"]
    assert (answers["empty"], answers["timeout"]) == (1, 0)  # answered, never held


def test_catch_up_paging_sees_every_comment_once_in_order(client, token):
    sent = [posted(client, 1, f"c{i}", token(1 + i % 3)) for i in range(7)]
    cursor, seen, pages = 0, [], 0
    while True:
        page = feed(client, 1, since=cursor, limit=3, wait=0)
        pages += 1
        if not page["comments"]:
            assert page["cursor"] == cursor
            break
        assert len(page["comments"]) <= 3
        assert page["cursor"] == page["comments"][-1]["seq"] > cursor
        seen.extend(page["comments"])
        cursor = page["cursor"]
        assert pages < 10
    assert pages == 4  # 3 + 3 + 1, then empty
    assert seen == sent
    assert cursor == 7


def test_tombstone_reaches_a_reader_following_cursors(client, token):
    first = posted(client, 1, "keep", token(1))
    doomed = posted(client, 1, "remove me", token(2))
    page = feed(client, 1)
    assert page["cursor"] == 2
    assert [c["id"] for c in page["comments"]] == [first["id"], doomed["id"]]

    resp = client.delete(f"/contents/1/comments/{doomed['id']}", headers={"Authorization": token(2)})
    assert resp.status_int == 204 and resp.body == b""

    changes, cursor = follow(client, 1, page["cursor"], 3)
    assert cursor == 3
    [tombstone] = changes
    assert set(tombstone) == FIELDS
    assert tombstone["id"] == doomed["id"]
    assert tombstone["body"] is None
    assert tombstone["deleted"] is True
    assert tombstone["seq"] == 3
    assert tombstone["author_id"] == 2 and tombstone["content_id"] == 1
    assert tombstone["created_at"] == doomed["created_at"]

    # Nothing more after the tombstone; a fresh page no longer shows it.
    assert feed(client, 1, since=3, wait=0)["comments"] == []
    fresh = feed(client, 1)
    assert [c["id"] for c in fresh["comments"]] == [first["id"]]
    assert fresh["cursor"] == 3
    # Nor does the full changes feed show the deleted body anywhere.
    everything = feed(client, 1, since=0, wait=0)["comments"]
    assert [(c["id"], c["body"]) for c in everything] == [(first["id"], "keep"), (doomed["id"], None)]


# -- replies -------------------------------------------------------------------


def reply(client, content_id, body, parent_id, auth, **kwargs):
    return client.post_json(
        f"/contents/{content_id}/comments", {"body": body, "parent_id": parent_id},
        headers={"Authorization": auth}, **kwargs,
    )


def test_a_reply_quotes_its_parent_everywhere(client, token):
    """In the POST's answer, the latest page, the changes, and lines."""
    parent = posted(client, 1, "x" * 79 + "ü€\t…", token(1))
    resp = reply(client, 1, "agreed", parent["id"], token(2))
    assert resp.status_int == 201
    summary = {"id": parent["id"], "author_id": 1, "excerpt": "x" * 79 + "ü", "deleted": False}
    assert (resp.json["parent_id"], resp.json["parent"]) == (parent["id"], summary)
    assert (parent["parent_id"], parent["parent"]) == (None, None)
    for page in (feed(client, 1), feed(client, 1, since=0, wait=0)):
        assert [c["parent"] for c in page["comments"]] == [None, summary]
    lines = client.get("/contents/1/comments", params={"format": "lines", "since": 1}).text
    assert lines.splitlines()[1].split("\t") == [
        "2", str(resp.json["id"]), "2", "0", "agreed", str(parent["id"]), "1", "0", "x" * 79 + "ü"]


def test_a_deleted_parents_replies_no_longer_quote_it(make_app, token):
    client = webtest.TestApp(make_app())
    parent = posted(client, 1, "regrettable", token(1))
    answer = reply(client, 1, "quoting", parent["id"], token(2)).json
    client.delete(f"/contents/1/comments/{parent['id']}", headers={"Authorization": token(1)})
    read = reply(client, 1, "too late", parent["id"], token(2), expect_errors=True)
    assert_error(read, 409, "parent_deleted")
    # Read from the database (a new app has no feed in memory): scrubbed, same seq.
    fresh = webtest.TestApp(make_app())
    [kept] = fresh.get("/contents/1/comments").json["comments"]
    assert kept["id"] == answer["id"] and kept["seq"] == answer["seq"]
    assert kept["parent"] == {"id": parent["id"], "author_id": 1, "excerpt": None,
                              "deleted": True}


@pytest.mark.parametrize("parent_id", [0, -1, "1", 1.5, True, [1], 2**63, 1e300])
def test_a_malformed_parent_id_is_400(client, token, parent_id):
    posted(client, 1, "parent", token(1))
    assert_error(reply(client, 1, "x", parent_id, token(1), expect_errors=True), 400,
                 "invalid_request")
    assert feed(client, 1)["cursor"] == 1


def test_a_parent_of_another_content_or_none_is_400(client, token):
    other = posted(client, 2, "elsewhere", token(1))
    for parent_id in (other["id"], other["id"] + 100):
        resp = reply(client, 1, "x", parent_id, token(1), expect_errors=True)
        assert_error(resp, 400, "invalid_request")
        assert resp.json["title"] == "No such parent"
    assert feed(client, 1)["cursor"] == 0
    assert reply(client, 2, "fine", None, token(1)).json["parent"] is None


def test_a_writer_reads_its_own_write_at_once(make_app, token):
    """Right after a 201 or 204, a short poll on the same process shows the change.

    The feed is already in memory (a viewer read it), so the answer comes
    from the window that the poller fills; the write waits for it.
    """
    app = make_app(poll_interval=30.0, feed_ttl=120.0)  # only the write can wake it
    client = webtest.TestApp(app)
    cursor = feed(client, 1)["cursor"]
    comment = posted(client, 1, "mine", token(1))
    page = feed(client, 1, since=cursor, wait=0)
    assert [c["id"] for c in page["comments"]] == [comment["id"]]
    client.delete(f"/contents/1/comments/{comment['id']}", headers={"Authorization": token(1)})
    page = feed(client, 1, since=page["cursor"], wait=0)
    assert [(c["id"], c["deleted"]) for c in page["comments"]] == [(comment["id"], True)]
    assert feed(client, 1)["comments"] == []


def test_query_string_form_gives_the_same_json(client, token):
    for i in range(4):
        posted(client, 9, f"c{i}", token(1))
    for params in ({}, {"limit": 2}, {"since": 1, "wait": 0}, {"since": 1, "limit": 2, "wait": 0}):
        by_path = client.get("/contents/9/comments", params=params)
        by_query = client.get("/comments", params={"content_id": 9, **params})
        assert by_query.body == by_path.body, params
        assert by_query.json["content_id"] == 9
        assert by_query.headers["Cache-Control"] == by_path.headers["Cache-Control"]
        assert int(by_query.headers["Content-Length"]) == len(by_query.body)


def test_query_string_form_needs_content_id(client):
    assert_error(client.get("/comments", expect_errors=True), 400, "invalid_request")


def test_huge_prefer_wait_is_not_an_error(client, token):
    posted(client, 1, "x", token(1))
    resp = client.get(
        "/contents/1/comments", params={"since": 0}, headers={"Prefer": "wait=" + "9" * 5000}
    )
    assert resp.status_int == 200
    assert [c["body"] for c in resp.json["comments"]] == ["x"]


# -- refusals --------------------------------------------------------------------


@pytest.fixture
def seeded(client, token):
    """Content 1 with one comment (author 1)."""
    return posted(client, 1, "existing", token(1))


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=lambda case: case.id)
def test_bad_request_is_refused_and_changes_nothing(case, app, client, seeded):
    state = db_state(app)
    page = feed(client, 1)
    changes = feed(client, 1, since=0, wait=0)

    resp = client.request(
        case.target(seeded["id"]), method=case.method, body=case.body or b"",
        headers=headers_for(case), expect_errors=True,
    )
    assert_error(resp, case.status, case.code)
    if case.status == 401:
        assert "Bearer" in resp.headers.get("WWW-Authenticate", "")

    assert db_state(app) == state
    assert feed(client, 1) == page
    assert feed(client, 1, since=0, wait=0) == changes


def test_request_over_configured_limit_is_413(make_app, token):
    app = make_app(max_body_bytes=200)
    client = webtest.TestApp(app)
    prefix, suffix = b'{"body": "', b'"}'

    def request_of(size):
        return prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix

    resp = client.post(
        "/contents/1/comments", request_of(201), content_type=JSON,
        headers={"Authorization": token(1)}, expect_errors=True,
    )
    assert_error(resp, 413, "too_large")
    assert db_state(app) == ([], [])
    resp = client.post(
        "/contents/1/comments", request_of(200), content_type=JSON,
        headers={"Authorization": token(1)},
    )
    assert resp.status_int == 201


def test_request_of_exactly_64KiB_is_not_refused_for_its_size(client, token):
    prefix, suffix = b'{"body": "x', b'"}'
    request = prefix + b" " * (64 * 1024 - len(prefix) - len(suffix)) + suffix
    resp = client.post(
        "/contents/1/comments", request, content_type=JSON,
        headers={"Authorization": token(1)}, expect_errors=True,
    )
    # Small enough to be read; then refused for its 2000+ characters.
    assert_error(resp, 400, "invalid_request")


def test_json_with_charset_is_accepted(client, token):
    resp = client.post(
        "/contents/1/comments", b'{"body": "hi"}', content_type="application/json; charset=utf-8",
        headers={"Authorization": token(1)},
    )
    assert resp.status_int == 201


def test_rate_limit_429_with_retry_after(make_app, token):
    app = make_app(post_rate="2/60")
    client = webtest.TestApp(app)
    posted(client, 1, "one", token(1))
    posted(client, 1, "two", token(1))
    state = db_state(app)

    resp = post(client, 1, "three", token(1), expect_errors=True)
    assert_error(resp, 429, "rate_limited")
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert db_state(app) == state
    page = feed(client, 1)
    assert [c["body"] for c in page["comments"]] == ["one", "two"] and page["cursor"] == 2

    # Per author: someone else may still post, elsewhere too.
    assert posted(client, 1, "other author", token(2))["seq"] == 3
    assert_error(post(client, 2, "elsewhere", token(1), expect_errors=True), 429, "rate_limited")


def test_refused_posts_do_not_use_up_the_rate_limit(make_app, token):
    client = webtest.TestApp(make_app(post_rate="2/60"))
    for _ in range(3):
        assert_error(post(client, 1, "   ", token(1), expect_errors=True), 400, "invalid_request")
    posted(client, 1, "one", token(1))
    posted(client, 1, "two", token(1))


# -- DELETE -------------------------------------------------------------------------


def test_author_deletes_own_comment(client, token, app):
    comment = posted(client, 1, "mine", token(4))
    resp = client.delete(f"/contents/1/comments/{comment['id']}", headers={"Authorization": token(4)})
    assert resp.status_int == 204
    assert resp.body == b""
    assert feed(client, 1)["comments"] == []
    assert feed(client, 1)["cursor"] == 2


def test_moderator_deletes_someone_elses_comment(client, token):
    comment = posted(client, 1, "rude", token(4))
    resp = client.delete(
        f"/contents/1/comments/{comment['id']}", headers={"Authorization": token(99, "moderator")}
    )
    assert resp.status_int == 204
    [tombstone] = feed(client, 1, since=1, wait=0)["comments"]
    assert tombstone["id"] == comment["id"] and tombstone["deleted"] is True
    assert tombstone["author_id"] == 4  # still the author, not the moderator


def test_other_user_may_not_delete(client, token, app):
    comment = posted(client, 1, "mine", token(4))
    state = db_state(app)
    resp = client.delete(
        f"/contents/1/comments/{comment['id']}", headers={"Authorization": token(5)},
        expect_errors=True,
    )
    assert_error(resp, 403, "forbidden")
    assert db_state(app) == state
    assert feed(client, 1)["comments"] == [comment]


def test_delete_unknown_or_foreign_comment_is_404(client, token, app):
    comment = posted(client, 1, "here", token(4))
    state = db_state(app)
    for path in (
        "/contents/1/comments/987654321",
        f"/contents/2/comments/{comment['id']}",
        f"/contents/{comment['content_id'] + 1000}/comments/{comment['id']}",
    ):
        resp = client.delete(path, headers={"Authorization": token(99, "moderator")},
                             expect_errors=True)
        assert_error(resp, 404, "not_found")
    assert db_state(app) == state


def test_delete_without_token_is_401(client, token, app):
    comment = posted(client, 1, "here", token(4))
    state = db_state(app)
    resp = client.delete(f"/contents/1/comments/{comment['id']}", expect_errors=True)
    assert_error(resp, 401, "unauthorized")
    assert db_state(app) == state


def test_deleting_twice_adds_no_second_change(client, token):
    comment = posted(client, 1, "twice", token(4))
    path = f"/contents/1/comments/{comment['id']}"
    assert client.delete(path, headers={"Authorization": token(4)}).status_int == 204
    resp = client.delete(path, headers={"Authorization": token(4)}, expect_errors=True)
    assert resp.status_int in (204, 404)
    page = feed(client, 1, since=0, wait=0)
    assert [(c["id"], c["deleted"]) for c in page["comments"]] == [(comment["id"], True)]
    assert page["cursor"] == 2


def test_deletion_after_a_reader_has_seen_the_comment(client, token):
    """A reader paging through catches the tombstone of a comment it already saw."""
    sent = [posted(client, 1, f"c{i}", token(1)) for i in range(4)]
    first = feed(client, 1, since=0, limit=2, wait=0)
    assert [c["id"] for c in first["comments"]] == [sent[0]["id"], sent[1]["id"]]
    client.delete(f"/contents/1/comments/{sent[0]['id']}", headers={"Authorization": token(1)})
    rest, cursor = follow(client, 1, first["cursor"], 5, limit=2)
    assert [(c["id"], c["deleted"]) for c in rest] == [
        (sent[2]["id"], False), (sent[3]["id"], False), (sent[0]["id"], True),
    ]
    assert [c["seq"] for c in rest] == [3, 4, 5]
    assert cursor == 5
