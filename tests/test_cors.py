"""CORS for browser clients on other origins, through WebTest."""

from __future__ import annotations

import pytest
import webtest

ALLOWED, EVIL = "https://a.example", "https://evil.example"


@pytest.fixture
def cors_client(make_app):
    return webtest.TestApp(make_app(cors_origins=ALLOWED))


def test_cors_allowed_origin_on_get_and_post(cors_client, token):
    resp = cors_client.get("/contents/1/comments", headers={"Origin": ALLOWED})
    assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
    resp = cors_client.post_json(
        "/contents/1/comments", {"body": "x"},
        headers={"Origin": ALLOWED, "Authorization": token(1)},
    )
    assert resp.status_int == 201
    assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
    exposed = resp.headers.get("Access-Control-Expose-Headers", "").lower()
    assert "location" in exposed


@pytest.mark.parametrize(
    "path, method",
    [("/contents/1/comments", "POST"), ("/contents/1/comments/1", "DELETE")],
)
def test_cors_preflight(cors_client, path, method):
    resp = cors_client.options(path, headers={
        "Origin": ALLOWED,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type",
    })
    assert 200 <= resp.status_int < 300
    assert resp.headers["Access-Control-Allow-Origin"] == ALLOWED
    methods = {m.strip().upper() for m in resp.headers["Access-Control-Allow-Methods"].split(",")}
    assert method in methods
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed or "*" in allowed


def test_cors_other_origin_gets_no_allow_origin(cors_client):
    resp = cors_client.get("/contents/1/comments", headers={"Origin": EVIL})
    assert resp.status_int == 200
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = cors_client.options("/contents/1/comments", headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST",
    }, expect_errors=True)
    assert "Access-Control-Allow-Origin" not in resp.headers


def test_no_cors_headers_unless_configured(client):
    resp = client.get("/contents/1/comments", headers={"Origin": ALLOWED})
    assert "Access-Control-Allow-Origin" not in resp.headers
