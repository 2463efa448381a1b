"""The shared-cache policy: per kind of answer, then its headers through WebTest.

The real caches in front (Varnish, nginx) are in ``test_caches.py``.
"""

from __future__ import annotations

import threading
import time

import pytest
import webtest
from conftest import make_settings

from service.live.pages import Kind, Page
from service.web.caching import cache_headers, idle_poll_after_ms

CONTENT = 7
SHARED = "public, max-age=0, s-maxage=2"


def page_of(kind, changes=()):
    return Page.encode(kind, CONTENT, changes, 5)


@pytest.mark.parametrize("kind", list(Kind))
def test_off_every_answer_is_no_store(kind):
    assert cache_headers(page_of(kind), make_settings()) == {"Cache-Control": "no-store"}


@pytest.mark.parametrize(("kind", "shared"), [
    (Kind.LATEST, True),
    (Kind.CATCH_UP, True),
    (Kind.WOKEN, True),
    # Empty answers too: one a cache may not keep would release the viewers
    # waiting for it to the service, one hold each.
    (Kind.TIMEOUT, True),
    (Kind.EMPTY, True),
    (Kind.SHED, False),
    (Kind.RESET, False),
])
def test_on_answers_are_shared_by_kind(kind, shared):
    headers = cache_headers(page_of(kind), make_settings(shared_cache_seconds=2))
    if shared:
        assert headers == {"Cache-Control": SHARED, "Vary": "Prefer"}
    else:
        assert headers == {"Cache-Control": "no-store"}


def test_with_cors_answers_vary_on_origin_too():
    settings = make_settings(shared_cache_seconds=1, cors_origins="https://a.example")
    assert cache_headers(page_of(Kind.WOKEN), settings)["Vary"] == "Prefer, Origin"
    settings = make_settings(shared_cache_seconds=1, cors_origins="*")
    assert cache_headers(page_of(Kind.WOKEN), settings)["Vary"] == "Prefer, Origin"


def test_empty_answers_ask_for_a_pause_as_long_as_their_cache_lifetime():
    assert idle_poll_after_ms(make_settings()) == 0
    assert idle_poll_after_ms(make_settings(shared_cache_seconds=3)) == 3000
    empty = page_of(Kind.CATCH_UP)
    timeout = empty.after_hold(3000)
    assert (timeout.kind, timeout.poll_after_ms, timeout.cursor) == (Kind.TIMEOUT, 3000, 5)
    assert b'"poll_after_ms":3000' in timeout.body
    assert empty.after_hold(0).body == empty.body  # off: the same bytes as before
    assert empty.idle(Kind.EMPTY, 3000).kind is Kind.EMPTY


class Change:
    seq = 6
    is_comment = True

    def to_json(self):
        return {"seq": self.seq}


def test_a_page_with_changes_is_never_made_idle():
    page = page_of(Kind.CATCH_UP, [Change()])
    assert page.idle(Kind.EMPTY, 3000) is page
    assert page.after_hold(3000).kind is Kind.WOKEN
    assert page.after_hold(3000).body == page.body


def test_the_setting_is_refused_below_zero():
    with pytest.raises(ValueError, match="shared_cache_seconds"):
        make_settings(shared_cache_seconds=-1)


# -- headers through the app ----------------------------------------------------


@pytest.fixture
def shared_client(make_app):
    app = make_app(shared_cache_seconds=2, threads=4, hold_budget=1, poll_interval=0.1,
                   max_wait=2, default_wait=1)
    return app, webtest.TestApp(app)


def in_thread(call):
    """Run ``call`` in a thread; the returned holder gets ``result`` when it ends."""
    holder = {}
    thread = threading.Thread(target=lambda: holder.setdefault("result", call()))
    thread.start()
    holder["thread"] = thread
    return holder


def wait_held(app, count):
    deadline = time.monotonic() + 5
    while app.hub.budget.held != count:
        assert time.monotonic() < deadline, f"expected {count} held"
        time.sleep(0.01)


def test_feed_answers_carry_the_policy_of_their_kind(shared_client, token):
    app, client = shared_client
    auth = {"Authorization": token(1)}
    created = client.post_json(f"/contents/{CONTENT}/comments", {"body": "one"}, headers=auth)
    assert created.headers["Cache-Control"] == "no-store"
    cursor = created.json["seq"]

    latest = client.get(f"/contents/{CONTENT}/comments")
    catch_up = client.get(f"/comments?content_id={CONTENT}&since=0")
    empty = client.get(f"/contents/{CONTENT}/comments?since={cursor}&wait=0")
    timeout = client.get(f"/contents/{CONTENT}/comments?since={cursor}&wait=1")
    reset = client.get(f"/contents/{CONTENT}/comments?since=999&wait=0")
    for resp in (latest, catch_up, empty, timeout):
        assert resp.headers["Cache-Control"] == SHARED, resp.request.url
        assert resp.headers["Vary"] == "Accept, Accept-Encoding, Prefer"
    assert latest.json["poll_after_ms"] == catch_up.json["poll_after_ms"] == 0
    assert empty.json["poll_after_ms"] == timeout.json["poll_after_ms"] == 2000
    assert empty.json["cursor"] == timeout.json["cursor"] == cursor
    assert reset.json["reset"] is True
    assert reset.headers["Cache-Control"] == "no-store"
    assert "Prefer" not in reset.headers.get("Vary", "")

    # One viewer held (the whole budget): the next long-poll is shed.
    held = in_thread(lambda: client.get(f"/contents/{CONTENT}/comments?since={cursor}&wait=2"))
    wait_held(app, 1)
    shed = client.get(f"/contents/{CONTENT}/comments?since={cursor}&wait=2")
    assert shed.json["poll_after_ms"] > 0
    assert shed.headers["Cache-Control"] == "no-store"
    client.post_json(f"/contents/{CONTENT}/comments", {"body": "two"}, headers=auth)
    held["thread"].join(5)
    woken = held["result"]
    assert [c["body"] for c in woken.json["comments"]] == ["two"]
    assert woken.headers["Cache-Control"] == SHARED

    deleted = client.delete(f"/contents/{CONTENT}/comments/{created.json['id']}", headers=auth)
    assert deleted.status_int == 204 and deleted.headers["Cache-Control"] == "no-store"
    assert client.get("/healthz").headers["Cache-Control"] == "no-store"
    answers = app.hub.status()["answers"]
    assert {kind: answers[kind] for kind in ("latest", "catch_up", "empty", "timeout", "shed",
                                              "reset", "woken")} == {
        "latest": 1, "catch_up": 1, "empty": 1, "timeout": 1, "shed": 1, "reset": 1, "woken": 1}


def test_prefer_answers_say_so_and_vary(shared_client):
    _, client = shared_client
    resp = client.get(f"/contents/{CONTENT}/comments", headers={"Prefer": "wait=1"})
    assert resp.headers["Preference-Applied"] == "wait=1"
    assert resp.headers["Vary"] == "Accept, Accept-Encoding, Prefer"


def test_every_viewer_at_one_url_gets_the_same_bytes(shared_client, token):
    app, client = shared_client
    client.post_json(f"/contents/{CONTENT}/comments", {"body": "x"},
                     headers={"Authorization": token(1)})
    one = client.get(f"/contents/{CONTENT}/comments?since=0", headers={"Authorization": token(1)})
    two = client.get(f"/contents/{CONTENT}/comments?since=0", headers={"Cookie": "a=b"})
    assert one.body == two.body
    assert "Set-Cookie" not in one.headers and "Set-Cookie" not in two.headers
    assert one.headers["Cache-Control"] == two.headers["Cache-Control"] == SHARED


def test_cors_answers_vary_on_origin(make_app):
    app = make_app(shared_cache_seconds=1, cors_origins="https://a.example")
    client = webtest.TestApp(app)
    resp = client.get(f"/contents/{CONTENT}/comments", headers={"Origin": "https://a.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert resp.headers["Vary"] == "Accept, Accept-Encoding, Prefer, Origin"
    vary = client.get(f"/contents/{CONTENT}/comments").headers["Vary"]
    assert vary == "Accept, Accept-Encoding, Prefer, Origin"


def test_off_feed_answers_stay_no_store_with_no_pause(make_app):
    client = webtest.TestApp(make_app(max_wait=1))
    empty = client.get(f"/contents/{CONTENT}/comments?since=0&wait=0")
    timeout = client.get(f"/contents/{CONTENT}/comments?since=0&wait=1")
    for resp in (empty, timeout):
        assert resp.headers["Cache-Control"] == "no-store"
        assert "Prefer" not in resp.headers.get("Vary", "")
        assert resp.json["poll_after_ms"] == 0
