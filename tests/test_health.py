"""Health, database failures and draining, through WebTest on SQLite and
PostgreSQL: a failure is a 503 JSON error with Retry-After, never a 500."""

from __future__ import annotations

import time

import pytest
import webtest
from bad_requests import JSON
from conftest import make_settings
from test_api import assert_error, post, posted

from service.app import create_app
from service.db.store import Store, comments, create_engine


def test_healthz_ok(client):
    resp = client.get("/healthz")
    assert resp.status_int == 200
    assert resp.json["status"] == "ok"


DEAD_DATABASES = [
    pytest.param("postgresql+psycopg2://postgres@127.0.0.1:1/nothing", id="postgresql-refused"),
    pytest.param("sqlite:////nonexistent-livecomments-dir/x/comments.db", id="sqlite-no-directory"),
]


@pytest.fixture(params=DEAD_DATABASES)
def dead_client(request):
    url = request.param
    app = create_app(make_settings(url), store=Store(create_engine(url)))
    yield webtest.TestApp(app)
    app.close()


def test_healthz_503_when_database_unreachable(dead_client):
    started = time.monotonic()
    resp = dead_client.get("/healthz", expect_errors=True)
    assert time.monotonic() - started < 5
    assert resp.status_int == 503
    assert resp.content_type == JSON
    assert resp.json["status"] != "ok"


def test_a_failing_health_check_logs_one_line_a_minute(dead_client, caplog):
    """A load balancer polls /healthz every few seconds: a database that
    is not there is one line, not a traceback per check."""
    caplog.set_level("WARNING", logger="service.db.store")
    for _ in range(5):
        assert dead_client.get("/healthz", expect_errors=True).status_int == 503
    lines = [r for r in caplog.records if "health check failed" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].exc_info is None and "\n" not in lines[0].getMessage()


def test_throttled_lines_count_what_they_hid():
    import logging

    from service.common.logs import Throttled

    now = [0.0]
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.getLogger("test-throttled")
    log.addHandler(Catch())
    throttled = Throttled(log, 60, clock=lambda: now[0])
    for t in (0, 1, 2, 59, 60, 61, 125):
        now[0] = t
        throttled.warning("failed: %s", "boom")
    assert seen == ["failed: boom", "failed: boom (and 3 more since the last line)",
                    "failed: boom (and 1 more since the last line)"]


def test_database_failure_is_a_503_json_error(dead_client, token):
    started = time.monotonic()
    for resp in (
        dead_client.get("/contents/1/comments", expect_errors=True),
        dead_client.get("/contents/1/comments?since=0&wait=0", expect_errors=True),
        dead_client.get("/comments?content_id=1", expect_errors=True),
        post(dead_client, 1, "hello", token(1), expect_errors=True),
        dead_client.delete("/contents/1/comments/1", headers={"Authorization": token(1)},
                           expect_errors=True),
    ):
        assert_error(resp, 503, "unavailable")
    assert time.monotonic() - started < 10


def test_database_error_mid_life_is_a_503(app, client, token):
    posted(client, 1, "before", token(1))
    with app.store.engine.begin() as conn:
        comments.drop(conn)
    for resp in (
        client.get("/contents/1/comments", expect_errors=True),
        post(client, 1, "after", token(1), expect_errors=True),
    ):
        assert_error(resp, 503, "unavailable")


def test_a_closing_app_refuses_feed_reads_with_503_and_keeps_writes(app, client, token):
    """While the server drains, reads get 503 JSON with Retry-After (clients
    retry elsewhere with their cursor), health says so, and writes still land."""
    first = posted(client, 1, "before", token(1))
    app.close()
    for path in ("/contents/1/comments", f"/contents/1/comments?since={first['seq']}",
                 "/comments?content_id=2&since=0&wait=0"):
        resp = client.get(path, expect_errors=True)
        assert_error(resp, 503, "unavailable")
        assert resp.headers["Retry-After"] == "2"
    health = client.get("/healthz", expect_errors=True)
    assert health.status_int == 503 and health.json["status"] == "draining"
    assert app.hub.pollers() == []
    second = posted(client, 1, "during the drain", token(1))
    assert second["seq"] == first["seq"] + 1


