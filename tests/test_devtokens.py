"""``POST /dev/tokens``: the demo's token route, in development mode only."""

from __future__ import annotations

import pytest
import webtest
from conftest import make_settings

from service.app import create_app


@pytest.fixture
def client_for(make_store, sqlite_url, signer):
    """``client_for(dev)``: a webtest client of an app with development mode on or off."""
    apps = []

    def make(dev):
        app = create_app(make_settings(sqlite_url, dev=dev), store=make_store(sqlite_url),
                         signer=signer)
        apps.append(app)
        return webtest.TestApp(app)

    yield make
    for app in apps:
        app.close()


@pytest.mark.parametrize("role", ["user", "moderator"])
def test_mints_a_token_that_posts_a_comment(client_for, signer, role):
    client = client_for(True)
    answer = client.post_json("/dev/tokens", {"author_id": 7, "role": role}, status=201)
    assert answer.headers["Cache-Control"] == "no-store"
    assert set(answer.json) == {"token", "author_id", "role"}
    assert answer.json["author_id"] == 7 and answer.json["role"] == role
    principal = signer.verify(answer.json["token"])
    assert (principal.author_id, principal.role) == (7, role)

    posted = client.post_json(
        "/contents/3/comments", {"body": "with a development token"},
        headers={"Authorization": f"Bearer {answer.json['token']}"}, status=201,
    )
    assert posted.json["author_id"] == 7
    shown = client.get("/contents/3/comments").json["comments"]
    assert [c["body"] for c in shown] == ["with a development token"]


def test_role_defaults_to_user(client_for):
    answer = client_for(True).post_json("/dev/tokens", {"author_id": 1}, status=201)
    assert answer.json["role"] == "user"


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_no_such_route_outside_development_mode(client_for, method):
    client = client_for(False)
    answer = client.request("/dev/tokens", method=method, body=b'{"author_id": 1}',
                            headers={"Content-Type": "application/json"}, expect_errors=True)
    assert answer.status_int == 404
    assert answer.json["code"] == "not_found"
    assert "token" not in answer.json


@pytest.mark.parametrize("body", [
    b'{"role": "user"}',
    b'{"author_id": 0}',
    b'{"author_id": -3}',
    b'{"author_id": 9223372036854775808}',
    b'{"author_id": "7"}',
    b'{"author_id": 7.5}',
    b'{"author_id": true}',
    b'{"author_id": null}',
    b'{"author_id": 7, "role": "admin"}',
    b'{"author_id": 7, "role": null}',
    b'{"author_id": 7, "role": ["user"]}',
    b'{"author_id": 7, "ttl": 10}',
    b'[1, "user"]',
    b'"author_id"',
    b"{author_id: 7}",
    b"",
    b'{"author_id": 7, "role": "' + b"u" * 2000 + b'"}',
], ids=lambda body: body[:40].decode())
def test_bad_input_is_a_400(client_for, body):
    answer = client_for(True).post("/dev/tokens", body, content_type="application/json",
                                   status=400)
    assert answer.json["code"] == "invalid_request"
    assert "token" not in answer.json


def test_only_json_is_read(client_for):
    answer = client_for(True).post("/dev/tokens", "author_id=7&role=moderator",
                                   content_type="application/x-www-form-urlencoded", status=415)
    assert answer.json["code"] == "unsupported_media_type"


def test_get_is_not_allowed(client_for):
    answer = client_for(True).get("/dev/tokens", status=405)
    assert answer.json["code"] == "method_not_allowed"
