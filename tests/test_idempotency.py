"""``Idempotency-Key``: a retried POST gets the first answer and stores
nothing more, on any process, on SQLite and PostgreSQL."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
import webtest
from bad_requests import JSON, assert_error_document, db_state
from conftest import make_settings
from fakes import WallClock

from service.app import create_app
from service.db import idempotency
from service.db.idempotency import IdempotencyKey
from service.db.tables import comments, idempotency_keys


@pytest.fixture
def clock():
    return WallClock()


@pytest.fixture
def make_client(database_url, make_store):
    """``make_client(clock=None, **settings)``: WebTest over an app with a store of its own."""
    apps = []

    def make(clock=None, **overrides):
        store = make_store(database_url, **({} if clock is None else {"clock": clock}))
        app = create_app(make_settings(database_url, **overrides), store=store)
        apps.append(app)
        return webtest.TestApp(app)

    yield make
    for app in apps:
        app.close()


def post(client, body, auth, key=None, content_id=1):
    headers = {"Authorization": auth}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post_json(f"/contents/{content_id}/comments", {"body": body},
                            headers=headers, expect_errors=True)


def feed(client, content_id=1):
    return client.get(f"/contents/{content_id}/comments", params={"since": 0, "wait": 0}).json


def keys(client):
    with client.app.store.engine.connect() as conn:
        return conn.execute(sa.select(idempotency_keys.c.key)).scalars().all()


def test_a_retry_gets_the_first_answer(make_client, token):
    client = make_client()
    first = post(client, "once", token(1), key="k-1")
    assert first.status_int == 201
    assert "Idempotent-Replayed" not in first.headers
    state = db_state(client.app)

    retry = post(client, "once", token(1), key="k-1")
    assert retry.status_int == 201
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json == first.json
    assert retry.headers["Location"] == first.headers["Location"]
    assert db_state(client.app) == state
    assert [c["body"] for c in feed(client)["comments"]] == ["once"]


def test_a_retry_reaching_another_process_gets_the_first_answer(make_client, token):
    """Two apps with engines of their own on one database: the record is shared."""
    first, second = make_client(), make_client()
    original = post(first, "once", token(1), key="k-1")
    retry = post(second, "once", token(1), key="k-1")
    assert retry.status_int == 201 and retry.json == original.json
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert len(feed(second)["comments"]) == 1


def test_the_key_with_another_body_or_content_is_422(make_client, token):
    client = make_client()
    assert post(client, "first", token(1), key="k").status_int == 201
    state = db_state(client.app)
    for resp in (post(client, "second", token(1), key="k"),
                 post(client, "first", token(1), key="k", content_id=2)):
        assert_error_document(resp.status_int, resp.content_type, resp.body, 422,
                              code="key_reused")
        assert "Idempotency-Key" in resp.json["title"]
    assert db_state(client.app) == state


def test_keys_are_per_author(make_client, token):
    client = make_client()
    mine = post(client, "same words", token(1), key="k")
    theirs = post(client, "same words", token(2), key="k")
    assert theirs.status_int == 201 and "Idempotent-Replayed" not in theirs.headers
    assert theirs.json["id"] != mine.json["id"]
    assert len(feed(client)["comments"]) == 2


def test_a_retry_is_answered_after_the_comment_was_deleted(make_client, token):
    """The first answer, as it was: the retry's body, the first seq, not deleted."""
    client = make_client()
    first = post(client, "gone later", token(1), key="k")
    client.delete(first.headers["Location"], headers={"Authorization": token(1)})
    retry = post(client, "gone later", token(1), key="k")
    assert retry.status_int == 201 and retry.json == first.json
    assert feed(client)["comments"][-1]["deleted"] is True


def test_replays_do_not_count_against_the_limit(make_client, token):
    """2/60: retries of the first post, even at the limit, are answered and cost nothing."""
    client = make_client(post_rate="2/60")
    first = post(client, "one", token(1), key="k1")
    for _ in range(3):
        assert post(client, "one", token(1), key="k1").json == first.json
    assert post(client, "two", token(1), key="k2").status_int == 201
    assert post(client, "three", token(1), key="k3").status_int == 429
    # At the limit, a retry still gets its answer; a new key does not.
    replay = post(client, "two", token(1), key="k2")
    assert replay.status_int == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert post(client, "three", token(1), key="k3").status_int == 429
    assert post(client, "other", token(1), key="k1").status_int == 422
    assert len(feed(client)["comments"]) == 2
    assert sorted(keys(client)) == ["k1", "k2"]


def test_a_key_is_new_again_after_the_ttl(make_client, clock, token):
    client = make_client(clock, idempotency_ttl=60)
    first = post(client, "hello", token(1), key="k")
    clock.seconds = 59.999
    assert post(client, "hello", token(1), key="k").json["id"] == first.json["id"]
    clock.seconds = 60  # kept for 60 s: expired from then on
    again = post(client, "hello", token(1), key="k")
    assert again.status_int == 201 and "Idempotent-Replayed" not in again.headers
    assert again.json["id"] != first.json["id"]
    # And it now answers for the second comment, to any body.
    assert post(client, "hello", token(1), key="k").json["id"] == again.json["id"]
    clock.seconds = 200
    assert post(client, "new words", token(1), key="k").status_int == 201


def test_expired_keys_are_swept(make_store, database_url, clock):
    """A keyed post that finds a sweep due deletes expired records, and only those."""
    store = make_store(database_url, clock=clock)
    ttl = 100
    store.post_comment(1, 1, "old", key=IdempotencyKey("old", ttl))  # sweeps nothing
    clock.seconds = 70
    store.post_comment(1, 1, "young", key=IdempotencyKey("young", ttl))
    clock.seconds = ttl + idempotency.KEY_SWEEP_INTERVAL
    store.post_comment(1, 2, "new", key=IdempotencyKey("new", ttl))
    with store.engine.connect() as conn:
        left = conn.execute(sa.select(idempotency_keys.c.key)).scalars().all()
    assert sorted(left) == ["new", "young"]


def test_a_sweep_deletes_a_batch_at_a_time(make_store, database_url, clock, monkeypatch):
    monkeypatch.setattr(idempotency, "KEY_SWEEP_BATCH", 3)
    store = make_store(database_url, clock=clock)
    for n in range(7):
        store.post_comment(1, 1, f"c{n}", key=IdempotencyKey(f"k{n}", 10))
    clock.seconds = 1000
    counts = []
    for n in range(3):
        store.post_comment(1, 2, f"late {n}", key=IdempotencyKey(f"late{n}", 10))
        with store.engine.connect() as conn:
            counts.append(conn.execute(
                sa.select(sa.func.count()).select_from(idempotency_keys)).scalar())
    # Each full batch makes the next keyed post sweep again.
    assert counts == [1 + 4, 2 + 1, 3]


@pytest.mark.parametrize("value, stored", [
    ("a", "a"),
    ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    ('"8e03978e-40d5"', "8e03978e-40d5"),  # the draft's structured-field string
    (r'"say \"hi\""', 'say "hi"'),
    ("x" * 255, "x" * 255),
    ("with space and ~!@#", "with space and ~!@#"),
])
def test_good_keys(make_client, token, value, stored):
    client = make_client()
    assert post(client, "hi", token(1), key=value).status_int == 201
    assert keys(client) == [stored]


@pytest.mark.parametrize("value", [
    "", '""', "x" * 256, '"' + "x" * 256 + '"', "caf\u00e9", "tab\there", "bell\x07",
])
def test_bad_keys_are_400_and_store_nothing(make_client, token, value):
    client = make_client()
    state = db_state(client.app)
    resp = post(client, "hi", token(1), key=value)
    document = assert_error_document(resp.status_int, resp.content_type, resp.body, 400,
                                     code="invalid_request")
    assert "Idempotency-Key" in document["title"]
    assert db_state(client.app) == state
    assert keys(client) == []


# -- concurrent duplicates, over real sockets -----------------------------------------


def _post_raw(server, body, auth, key, content_id=1):
    conn = http.client.HTTPConnection(server.adj.host, server.adj.port, timeout=30)
    try:
        conn.request("POST", f"/contents/{content_id}/comments", body=json.dumps({"body": body}),
                     headers={"Content-Type": JSON, "Authorization": auth,
                              "Idempotency-Key": key})
        resp = conn.getresponse()
        return resp.status, resp.headers, json.loads(resp.read())
    finally:
        conn.close()


def _at_once(count, call):
    start = threading.Barrier(count)

    def run(n):
        start.wait(timeout=30)
        return call(n)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_concurrent_duplicates_store_one_comment(make_app, make_server, token):
    """Ten identical keyed posts at once: one comment; all get 201 with its id.
    The limit counts it once."""
    app = make_app(post_rate="5/600")
    server = make_server(app)
    answers = _at_once(10, lambda n: _post_raw(server, "only once", token(1), "dup"))
    assert [status for status, _, _ in answers] == [201] * 10
    assert len({document["id"] for _, _, document in answers}) == 1
    assert sum(headers["Idempotent-Replayed"] == "true" for _, headers, _ in answers) == 9
    assert len({headers["Location"] for _, headers, _ in answers}) == 1
    client = webtest.TestApp(app)
    assert [c["body"] for c in feed(client)["comments"]] == ["only once"]
    # One post counted: four more are allowed.
    statuses = [_post_raw(server, f"more {n}", token(1), f"more {n}")[0] for n in range(5)]
    assert statuses == [201, 201, 201, 201, 429]


def test_concurrent_reuses_store_one_comment(make_app, make_server, token):
    """One key, ten different bodies at once: one is stored, the others get 422."""
    server = make_server(make_app())
    answers = _at_once(10, lambda n: _post_raw(server, f"body {n}", token(1), "same"))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [201] + [422] * 9


def test_concurrent_keyed_posts_to_different_contents_wait_for_the_first(make_store, database_url):
    """One key, ten contents at once: nothing orders them but the key's record,
    so the later ones wait on it, then find it is another request's."""
    store = make_store(database_url)
    key = IdempotencyKey("one key", 60)

    def attempt(n):
        try:
            return store.post_comment(n + 1, 1, "same body", key=key).comment.id
        except idempotency.KeyReused:
            return "reused"

    results = _at_once(10, attempt)
    assert results.count("reused") == 9
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(comments)).scalar() == 1
    assert sum(store.current_seq(n + 1) for n in range(10)) == 1
