"""The posting limit, kept in the database: a token bucket per author (N at
once, N per S seconds back) with an exact Retry-After, shared by every
process, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
import webtest
from bad_requests import db_state
from conftest import make_settings
from fakes import WallClock

from service.app import create_app
from service.db.limits import PostLimit, RateLimited
from service.db.tables import author_limits, comments


@pytest.fixture
def clock():
    return WallClock()


@pytest.fixture
def clocked_store(make_store, database_url, clock):
    return make_store(database_url, clock=clock)


def post(store, limit, author_id=1, content_id=1, body="hi"):
    """0 if the post was stored, else the Retry-After it was refused with."""
    try:
        store.post_comment(content_id, author_id, body, limit=limit)
    except RateLimited as exc:
        return exc.retry_after
    return 0


def test_a_burst_of_n_then_the_next_waits_exactly(clocked_store, clock):
    """5/10: five posts at once; the sixth waits one refill, 10/5 = 2 s."""
    limit = PostLimit(5, 10)
    assert [post(clocked_store, limit) for _ in range(5)] == [0] * 5
    retry = post(clocked_store, limit)
    assert retry == 2 and isinstance(retry, int)
    clock.seconds = 1.999
    assert post(clocked_store, limit) == 1  # rounded up, never 0
    clock.seconds = 2.0
    assert post(clocked_store, limit) == 0
    assert post(clocked_store, limit) == 2


def test_retry_after_is_the_wait_rounded_up(clocked_store, clock):
    """2/60: a refill every 30 s; asked at 3.7 s, the answer is 27 (26.3 rounded up)."""
    limit = PostLimit(2, 60)
    assert post(clocked_store, limit) == 0
    assert post(clocked_store, limit) == 0
    clock.seconds = 3.7
    assert post(clocked_store, limit) == 27
    clock.seconds = 3.7 + 26
    assert post(clocked_store, limit) == 1
    clock.seconds = 30
    assert post(clocked_store, limit) == 0


def test_refused_posts_store_nothing_and_do_not_extend_the_wait(clocked_store, clock):
    limit = PostLimit(2, 10)
    post(clocked_store, limit)
    post(clocked_store, limit)
    before = _rows(clocked_store)
    for step in range(5):
        clock.seconds = step
        assert post(clocked_store, limit) == 5 - step
    assert _rows(clocked_store) == before
    assert clocked_store.current_seq(1) == 2
    clock.seconds = 5
    assert post(clocked_store, limit) == 0


def test_the_allowance_comes_back_at_n_per_s(clocked_store, clock):
    """After a burst, one post per S/N; after S quiet seconds, a whole burst again."""
    limit = PostLimit(3, 9)
    assert [post(clocked_store, limit) for _ in range(3)] == [0, 0, 0]
    for t in (3, 6, 9):
        clock.seconds = t
        assert post(clocked_store, limit) == 0
        assert post(clocked_store, limit) == 3
    clock.seconds = 9 + 9
    assert [post(clocked_store, limit) for _ in range(4)] == [0, 0, 0, 3]


def test_authors_have_buckets_of_their_own(clocked_store):
    limit = PostLimit(1, 60)
    assert post(clocked_store, limit, author_id=1) == 0
    assert post(clocked_store, limit, author_id=1) == 60
    assert post(clocked_store, limit, author_id=1, content_id=2) == 60
    assert post(clocked_store, limit, author_id=2) == 0


def test_a_fractional_window(clocked_store, clock):
    """1/0.5, one post per half second."""
    limit = PostLimit(1, 0.5)
    assert post(clocked_store, limit) == 0
    clock.seconds = 0.2
    assert post(clocked_store, limit) == 1
    clock.seconds = 0.5
    assert post(clocked_store, limit) == 0


def test_a_clock_going_back_frees_nothing(clocked_store, clock):
    """A host whose clock is behind cannot post on an allowance not yet back."""
    limit = PostLimit(1, 10)
    clock.seconds = 100
    assert post(clocked_store, limit) == 0
    clock.seconds = 50
    assert post(clocked_store, limit) == 60


def test_posts_without_a_limit_touch_no_bucket(store):
    store.post_comment(1, 1, "free")
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(author_limits)).scalar() == 0


def test_concurrent_posts_by_one_author_get_exactly_n(make_store, database_url):
    """20 posts by one author at once, from 20 threads: exactly N are stored."""
    store = make_store(database_url)
    limit = PostLimit(5, 600)
    start = threading.Barrier(20)

    def attempt(n):
        start.wait(timeout=30)
        return post(store, limit, content_id=1 + n % 3, body=f"post {n}")

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(attempt, range(20)))
    assert results.count(0) == 5
    assert all(retry >= 1 for retry in results if retry)
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(comments)).scalar() == 5
    assert sum(store.current_seq(content) for content in (1, 2, 3)) == 5


# -- over HTTP, and across processes ---------------------------------------------


def _rows(store):
    with store.engine.connect() as conn:
        return conn.execute(sa.select(comments).order_by(comments.c.id)).all()


def _post(client, body, auth, content_id=1):
    return client.post_json(f"/contents/{content_id}/comments", {"body": body},
                            headers={"Authorization": auth}, expect_errors=True)


@pytest.fixture
def make_clocked_app(database_url, make_store):
    """``make_clocked_app(clock, **settings)``: an app with its own engine and store clock."""
    apps = []

    def make(clock=None, **overrides):
        kwargs = {} if clock is None else {"clock": clock}
        store = make_store(database_url, **kwargs)
        app = create_app(make_settings(database_url, **overrides), store=store)
        apps.append(app)
        return webtest.TestApp(app)

    yield make
    for app in apps:
        app.close()


def test_two_processes_share_the_limit(make_clocked_app, clock, token):
    """5/10: three posts through one process and three through another (two
    engines on one database): the sixth is refused, whichever process it reaches."""
    first = make_clocked_app(clock, post_rate="5/10")
    second = make_clocked_app(clock, post_rate="5/10")
    for n in range(3):
        assert _post(first, f"a{n}", token(1)).status_int == 201
    for n in range(2):
        assert _post(second, f"b{n}", token(1)).status_int == 201
    state = db_state(second.app)
    refused = _post(second, "b2", token(1))
    assert refused.status_int == 429
    assert refused.content_type == "application/json"
    assert refused.headers["Retry-After"] == "2"
    assert _post(first, "a3", token(1)).status_int == 429
    assert db_state(first.app) == state
    assert _post(first, "someone else", token(2)).status_int == 201


def test_http_retry_after_is_exact(make_clocked_app, clock, token):
    """With the store's clock fixed, Retry-After is the bucket's wait rounded up."""
    client = make_clocked_app(clock, post_rate="3/10")
    for n in range(3):
        assert _post(client, f"p{n}", token(1)).status_int == 201
    clock.seconds = 0.5
    refused = _post(client, "p3", token(1))
    assert refused.status_int == 429
    assert refused.headers["Retry-After"] == "3"  # 10/3 - 0.5 = 2.83 s
    assert "3 s" in refused.json["description"]
    assert refused.json["code"] == "rate_limited"
    clock.seconds = 10 / 3
    assert _post(client, "p3", token(1)).status_int == 201


def test_rate_limit_off_lets_everything_through(make_clocked_app, token):
    client = make_clocked_app(post_rate="0")
    for n in range(12):
        assert _post(client, f"p{n}", token(1)).status_int == 201
