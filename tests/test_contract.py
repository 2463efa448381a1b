"""The API document, ``docs/openapi.yaml``, against the app's real answers.

Every status the document lists for every operation is produced for real
through WebTest, on SQLite and PostgreSQL, and openapi-core validates the
response against the document, and the request too: it must pass where the
app accepted it, and fail where the app refused it as invalid. The routes
the app serves and the operations the document lists must be one set
(in development mode; without it, less the operations marked
``x-development-only``). The cases of the clients' routes and formats are
in contract_clients.py, those of moderation in contract_moderation.py.
"""

from __future__ import annotations

import gzip
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import falcon.inspect
import jsonschema
import pytest
import sqlalchemy as sa
import webtest
import werkzeug
from bad_requests import BAD_REQUESTS, headers_for
from conftest import make_settings
from contract_clients import CASES as CLIENT_CASES
from contract_clients import format_pages, format_refusals
from contract_feeds import CASES as FEEDS_CASES
from contract_feeds import feeds_pages, feeds_refusals
from contract_moderation import CASES as MODERATION_CASES
from contract_moderation import banned_posts, conflicting_posts, moderated_pages, slow_posts
from openapi_core import Config, OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest
from openapi_core.exceptions import OpenAPIError
from werkzeug.datastructures import Headers

from service.app import create_app
from service.common.errors import ErrorCode
from service.db.store import Store, create_engine
from service.web import formats
from service.web.openapi import load_spec

SPEC = load_spec()
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
#: Statuses that refuse the request itself: the document must refuse it too.
#: (Every 414 of the cases names more feeds than the document's list allows.)
REFUSALS = {400, 401, 413, 414, 415}
DEAD_DATABASES = {
    "sqlite": "sqlite:////nonexistent-livecomments-dir/x/comments.db",
    "postgresql": "postgresql+psycopg2://postgres@127.0.0.1:1/nothing",
}
API_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def text(value, **parameters):
    return value.decode(parameters.get("charset", "utf-8"))


#: Media types openapi-core does not know are text: read them as strings,
#: so their schemas (a pattern) apply.
TEXT_MEDIA_TYPES = {name: text for name in
                    ("text/event-stream", "application/javascript", "text/css",
                     "application/openmetrics-text")}


@pytest.fixture(scope="module")
def openapi():
    # Also checks the document is valid OpenAPI 3.1.
    return OpenAPI.from_dict(SPEC, config=Config(extra_media_type_deserializers=TEXT_MEDIA_TYPES))


def documented_responses():
    """``(METHOD, path, status)`` for every response the document lists."""
    return {
        (method.upper(), path, int(status))
        for path, item in SPEC["paths"].items()
        for method, operation in item.items()
        if method in METHODS
        for status in operation["responses"]
    }


# -- openapi-core over WebTest ---------------------------------------------------


class OpenAPIResponse:
    """A WebTest response as openapi-core's response protocol."""

    def __init__(self, resp):
        self.data = resp.body
        if resp.headers.get("Content-Encoding") == "gzip":
            self.data = gzip.decompress(resp.body)  # as a client reads it
        self.status_code = resp.status_int
        self.content_type = resp.content_type or ""
        self.headers = Headers(resp.headerlist)


def openapi_request(req):
    """A WebTest request as werkzeug's, its body readable once more."""
    stream = req.environ["wsgi.input"]
    stream = getattr(stream, "input", stream)  # inside WebTest's lint wrapper, a BytesIO
    stream.seek(0)
    environ = dict(req.environ, **{"wsgi.input": io.BytesIO(stream.read())})
    return WerkzeugOpenAPIRequest(werkzeug.Request(environ))


def request_verdict(resp):
    """Whether the document must accept the request; None if it cannot tell."""
    if getattr(resp, "contract_unjudged", False):
        return None  # refused on what only the database knows (contract_moderation.unjudged)
    if resp.status_int == 401 and resp.request.headers.get("Authorization", "").lower().startswith(
        "bearer"
    ):
        return None  # a token's signature and expiry are checked with the server's secret
    if (resp.status_int == 400 and resp.content_type == "application/json"
            and resp.json.get("title") == "No such parent"):
        return None  # a well-formed parent_id that names no comment: the database's say
    if resp.request.path == "/comments" and (
            ("content_id" in resp.request.GET) == ("feeds" in resp.request.GET)):
        # Neither or both: OpenAPI cannot say "one of two parameters", so the
        # document lists both as optional and says so in words.
        return None
    callback = resp.request.GET.get("callback")
    if (resp.status_int == 400 and callback is not None and formats.valid_callback(callback)
            and resp.json["title"] == "JSONP not allowed"):
        # A well-formed callback= where JSONP is not allowed: the jsonp
        # setting is the server's, and OpenAPI lets any operation take
        # query parameters it does not list.
        return None
    return resp.status_int not in REFUSALS


def validate(openapi, resp, *, judge_request=True):
    """The response fits the document, and so does the request iff the app took it."""
    request = openapi_request(resp.request)
    verdict = request_verdict(resp) if judge_request else None
    if verdict:
        openapi.validate_request(request)
    elif verdict is not None:
        with pytest.raises(OpenAPIError):
            openapi.validate_request(request)
    openapi.validate_response(request, OpenAPIResponse(resp))
    if resp.status_int >= 400 and resp.request.path != "/healthz":  # its 503 is a Health
        assert_error_code(resp)


#: The ``code`` of the ``Error`` schema: the enum openapi-core checks JSON errors against.
CODE_ENUM = SPEC["components"]["schemas"]["Error"]["properties"]["code"]["enum"]


def assert_error_code(resp):
    """An error's code, JSON or in a line, is one of the list and sent with
    its own status."""
    if resp.content_type == "text/plain":
        kind, code, _ = resp.text.split(" ", 2)
        assert kind == "error", resp.text
    else:
        code = resp.json["code"]
    assert code in CODE_ENUM, code
    assert resp.status_int in ErrorCode(code).statuses, (resp.status_int, code)
    assert not ErrorCode(code).reserved, code


def template_regex(path):
    return re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path)))


# -- producing every documented status ------------------------------------------


class Env:
    """What the cases need: clients of this test's database, a dead one, tokens."""

    def __init__(self, make_app, token, dialect):
        self._make_app = make_app
        self.token = token
        self._dialect = dialect
        self._closing = []

    def client(self, **settings):
        return webtest.TestApp(self._make_app(**settings))

    @cached_property
    def live(self):
        return self.client()

    @cached_property
    def dead(self):
        """A client whose database does not answer."""
        url = DEAD_DATABASES[self._dialect]
        app = create_app(make_settings(url), store=Store(create_engine(url)))
        self._closing.append(app)
        return webtest.TestApp(app)

    @cached_property
    def comment(self):
        """A comment of author 1 on content 1."""
        return self.post(self.live, "existing").json

    def post(self, client, body, author=1, content_id=1, parent_id=None, headers=None,
             **kwargs):
        document = {"body": body} if parent_id is None else {"body": body, "parent_id": parent_id}
        return client.post_json(f"/contents/{content_id}/comments", document,
                                 headers={"Authorization": self.token(author), **(headers or {})},
                                 **kwargs)

    def delete(self, client, path, author=None, **kwargs):
        headers = {} if author is None else {"Authorization": self.token(author)}
        return client.delete(path, headers=headers, expect_errors=True, **kwargs)

    def close(self):
        for app in self._closing:
            app.close()


@pytest.fixture
def env(make_app, token, database_url):
    env = Env(make_app, token, sa.engine.make_url(database_url).get_backend_name())
    yield env
    env.close()


CASES = {}


def case(method, path, status):
    """Register how to produce ``status`` from ``method path`` (one or more responses)."""

    def register(produce):
        CASES[method, path, status] = produce
        return produce

    return register


FEED = "/contents/{content_id}/comments"
COMMENT = "/contents/{content_id}/comments/{comment_id}"


def feed_pages(env, get):
    """Every kind of 200 a feed gives; ``get(**params)`` reads content 1."""
    first = env.comment
    doomed = env.post(env.live, "doomed", author=2).json
    env.post(env.live, "a reply to the doomed", author=3, parent_id=doomed["id"])
    env.post(env.live, "a reply", author=3, parent_id=first["id"])
    env.delete(env.live, f"/contents/1/comments/{doomed['id']}", author=2)
    latest = get()
    cursor = latest.json["cursor"]
    with ThreadPoolExecutor(1) as pool:  # held, then woken by a change
        held = pool.submit(get, since=cursor, wait=5)
        time.sleep(0.2)
        env.post(env.live, "wakes the viewer")
        woken = held.result()
    assert woken.json["comments"], woken.json
    pages = [
        latest,
        get(since=0, wait=0),  # changes: a comment and a tombstone
        get(since=0, wait=0, limit=1),
        woken,
        get(headers={"Prefer": "wait=1"}, since=woken.json["cursor"]),  # held, timed out
        get(since=cursor + 100, wait=0),  # ahead of the content: reset
    ]
    assert [c["id"] for c in pages[2].json["comments"]] == [first["id"]]
    assert any(c["deleted"] for c in pages[1].json["comments"])
    parents = [c["parent"] for c in pages[1].json["comments"] if c["parent"]]
    assert {(p["id"], p["excerpt"], p["deleted"]) for p in parents} == {
        (doomed["id"], None, True), (first["id"], "existing", False)}
    assert pages[4].headers["Preference-Applied"] == "wait=1"
    assert pages[4].json["comments"] == []
    assert pages[5].json["reset"] is True
    return pages


def by_path(client, content_id=1, headers=None, **params):
    return client.get(f"/contents/{content_id}/comments", params=params, headers=headers or {},
                      expect_errors=True)


def by_query(client, content_id=1, headers=None, **params):
    return client.get("/comments", params={"content_id": content_id, **params},
                      headers=headers or {}, expect_errors=True)


@case("GET", FEED, 200)
def _(env):
    return (feed_pages(env, lambda **kw: by_path(env.live, **kw)) + format_pages(env, by_path)
            + moderated_pages(env, by_path))


@case("GET", FEED, 400)
def _(env):
    return [by_path(env.live, since=-1), by_path(env.live, limit=201),
            env.live.get("/contents/abc/comments", expect_errors=True),
            *format_refusals(env, by_path)]


@case("GET", FEED, 503)
def _(env):
    return [by_path(env.dead), by_path(env.dead, since=0, wait=0),
            by_path(env.dead, format="lines")]


@case("GET", "/comments", 200)
def _(env):
    return (feed_pages(env, lambda **kw: by_query(env.live, **kw)) + format_pages(env, by_query)
            + moderated_pages(env, by_query) + feeds_pages(env))


@case("GET", "/comments", 400)
def _(env):
    return [env.live.get("/comments", expect_errors=True), by_query(env.live, content_id=0),
            *format_refusals(env, by_query), *feeds_refusals(env)]


@case("GET", "/comments", 503)
def _(env):
    return [by_query(env.dead), by_query(env.dead, headers={"Accept": "text/plain"}),
            env.dead.get("/comments?feeds=1:0,2", expect_errors=True),
            env.dead.get("/comments?feeds=1:0,2:0&wait=0&format=lines", expect_errors=True)]


@case("POST", FEED, 201)
def _(env):
    resp = env.post(env.live, "first! <b>🎉</b>\n")
    assert resp.headers["Location"] == f"/contents/1/comments/{resp.json['id']}"
    assert (resp.json["parent_id"], resp.json["parent"]) == (None, None)
    # A reply: its parent's summary comes back with it.
    reply = env.post(env.live, "agreed", author=2, parent_id=env.comment["id"])
    assert reply.json["parent_id"] == env.comment["id"]
    assert reply.json["parent"] == {"id": env.comment["id"], "author_id": 1,
                                    "excerpt": "existing", "deleted": False}
    return [resp, reply]


@case("POST", FEED, 409)
def _(env):
    """A reply to a deleted comment; a closed content; a duplicate."""
    env.delete(env.live, f"/contents/1/comments/{env.comment['id']}", author=1)
    resp = env.post(env.live, "too late", parent_id=env.comment["id"], expect_errors=True)
    assert resp.json["title"] == "Parent deleted"
    return [resp, *conflicting_posts(env)]


@case("POST", FEED, 403)
def _(env):
    """A banned author."""
    return banned_posts(env)


@case("POST", FEED, 400)
def _(env):
    other = env.post(env.live, "on content 2", content_id=2).json
    missing = [env.post(env.live, "x", parent_id=parent, expect_errors=True)
               for parent in (987654321, other["id"])]
    assert {resp.json["title"] for resp in missing} == {"No such parent"}
    return [*missing,
            env.post(env.live, "x", parent_id=0, expect_errors=True),
            env.post(env.live, "x", parent_id="12", expect_errors=True),
            env.post(env.live, "   ", expect_errors=True),
            env.live.post("/contents/1/comments", b'{"body": "x"', content_type="application/json",
                          headers={"Authorization": env.token(1)}, expect_errors=True)]


@case("POST", FEED, 401)
def _(env):
    return [env.live.post_json("/contents/1/comments", {"body": "hi"}, expect_errors=True),
            env.live.post_json("/contents/1/comments", {"body": "hi"}, expect_errors=True,
                               headers={"Authorization": "Bearer not-a-token"})]


@case("POST", FEED, 413)
def _(env):
    return env.post(env.live, "x" * 70_000, expect_errors=True)


@case("POST", FEED, 415)
def _(env):
    return env.live.post("/contents/1/comments", b"hello", content_type="text/plain",
                         headers={"Authorization": env.token(1)}, expect_errors=True)


@case("POST", FEED, 422)
def _(env):
    key = {"Idempotency-Key": "contract-422"}
    env.post(env.live, "first", headers=key)
    return [env.post(env.live, "another body", headers=key, expect_errors=True),
            env.post(env.live, "first", content_id=2, headers=key, expect_errors=True)]


@case("POST", FEED, 429)
def _(env):
    client = env.client(post_rate="1/60")
    env.post(client, "one")
    limited = env.post(client, "two", expect_errors=True)
    assert limited.json["code"] == "rate_limited"
    return [limited, slow_posts(env)]


@case("POST", FEED, 503)
def _(env):
    return env.post(env.dead, "hello", expect_errors=True)


@case("DELETE", COMMENT, 204)
def _(env):
    return env.delete(env.live, f"/contents/1/comments/{env.comment['id']}", author=1)


@case("DELETE", COMMENT, 400)
def _(env):
    return env.delete(env.live, "/contents/1/comments/abc", author=1)


@case("DELETE", COMMENT, 401)
def _(env):
    return env.delete(env.live, f"/contents/1/comments/{env.comment['id']}")


@case("DELETE", COMMENT, 403)
def _(env):
    return env.delete(env.live, f"/contents/1/comments/{env.comment['id']}", author=2)


@case("DELETE", COMMENT, 404)
def _(env):
    return env.delete(env.live, "/contents/1/comments/987654321", author=1)


@case("DELETE", COMMENT, 503)
def _(env):
    return env.delete(env.dead, "/contents/1/comments/1", author=1)


@case("GET", "/healthz", 200)
def _(env):
    return env.live.get("/healthz")


@case("GET", "/healthz", 503)
def _(env):
    return [env.dead.get("/healthz", expect_errors=True), stale_health(env)]


def stale_health(env):
    """A poller whose queries fail while the database answers: stale."""
    client = env.client(poll_interval=0.05, notify_poll_interval=0.1, poll_backoff_max=0.1,
                        stale_after=0.3)
    client.get("/contents/1/comments")  # a feed, and its poller
    engine = client.app.store.engine.execution_options(write=True)
    with engine.begin() as conn:  # the poller's table goes away; SELECT 1 still answers
        conn.exec_driver_sql("ALTER TABLE comments RENAME TO comments_away")
    try:
        deadline = time.monotonic() + 10
        while True:
            resp = client.get("/healthz", expect_errors=True)
            if resp.status_int == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE comments_away RENAME TO comments")
    assert resp.json["status"] == "stale", resp.json
    assert list(resp.json["pollers"]["stale"]) == ["1"]
    deadline = time.monotonic() + 10
    while client.get("/healthz", expect_errors=True).status_int != 200:  # back once it polls
        assert time.monotonic() < deadline, "still stale with its table back"
        time.sleep(0.05)
    return resp


@case("GET", "/metrics", 200)
def _(env):
    env.post(env.live, "counted")
    plain = env.live.get("/metrics")
    assert "livecomments_writes_total{method=\"POST\",status=\"201\"} 1.0" in plain.text
    assert plain.headers["Cache-Control"] == "no-store"
    openmetrics = env.live.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.content_type == "application/openmetrics-text"
    return [plain, openmetrics]


@case("GET", "/healthz", 400)
def _(env):
    return env.live.get("/healthz", params={"callback": "cb"}, expect_errors=True)


@case("GET", "/openapi.json", 400)
def _(env):
    return env.live.get("/openapi.json", params={"callback": "cb"}, expect_errors=True)


@case("GET", "/openapi.json", 200)
def _(env):
    resp = env.live.get("/openapi.json")
    assert resp.json == SPEC
    return resp


CASES.update(CLIENT_CASES)
CASES.update(MODERATION_CASES)
CASES.update(FEEDS_CASES)


# -- the tests --------------------------------------------------------------------


def test_every_documented_response_has_a_case():
    assert set(CASES) == documented_responses()


@pytest.mark.parametrize("key", sorted(CASES), ids=lambda key: f"{key[0]} {key[1]} {key[2]}")
def test_documented_response_is_real_and_valid(key, env, openapi):
    method, path, status = key
    responses = CASES[key](env)
    for resp in responses if isinstance(responses, list) else [responses]:
        where = f"{resp.request.method} {resp.request.path_qs}"
        assert resp.status_int == status, f"{where}: {resp.status} {resp.body[:300]!r}"
        assert resp.request.method == method
        assert template_regex(path).fullmatch(resp.request.path), where
        validate(openapi, resp)


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=lambda bad: bad.id)
def test_every_refusal_fits_the_document(bad, env, openapi):
    resp = env.live.request(
        bad.target(env.comment["id"]), method=bad.method, body=bad.body or b"",
        headers=headers_for(bad), expect_errors=True,
    )
    assert resp.status_int == bad.status
    # openapi-core's own JSON parsing overflows on 50,000 nested arrays.
    validate(openapi, resp, judge_request=bad.id != "deeply-nested-json")


def served_operations(app):
    return {
        (method.method, route.path)
        for route in falcon.inspect.inspect_app(app).routes
        for method in route.methods
        if not method.internal  # Falcon's OPTIONS and 405 responders
    }


#: Operations that exist only in development mode (``x-development-only``).
DEVELOPMENT_ONLY = {
    (method.upper(), path)
    for path, item in SPEC["paths"].items()
    for method, operation in item.items()
    if method in METHODS and operation.get("x-development-only")
}


def test_routes_are_the_documented_operations(app, make_app):
    documented = {(method, path) for method, path, _ in documented_responses()}
    assert DEVELOPMENT_ONLY == {("POST", "/dev/tokens")}
    assert served_operations(make_app(dev=True)) == documented
    assert served_operations(app) == documented - DEVELOPMENT_ONLY


@pytest.mark.parametrize("method, path, status", [
    ("PUT", "/contents/1/comments", 405),
    ("GET", "/contents/1/comments/1", 405),
    ("POST", "/healthz", 405),
    ("GET", "/nothing/here", 404),
])
def test_undocumented_method_or_path_is_an_error_document(client, method, path, status):
    resp = client.request(path, method=method, expect_errors=True)
    assert resp.status_int == status
    assert resp.content_type == "application/json"
    jsonschema.Draft202012Validator(SPEC["components"]["schemas"]["Error"]).validate(resp.json)
    assert resp.json["code"] == {404: "not_found", 405: "method_not_allowed"}[status]
    if status == 405:
        assert resp.headers["Allow"]


def test_api_page_names_every_documented_path():
    text = API_MD.read_text(encoding="utf-8")
    for path in SPEC["paths"]:
        assert f"`{path}`" in text or f" {path}" in text, path


# -- the error codes: one list, in the code, the document and the page ----------------


def api_md_error_codes():
    """``{code: (statuses, reserved)}`` from the table of api.md's "Errors"."""
    text = API_MD.read_text(encoding="utf-8")
    section = text[text.index("\n## Errors\n"):]
    section = section[:section.index("\n## ", 1)]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([0-9, ]+) \| (.+) \|$", section, re.MULTILINE)
    assert rows, "api.md's Errors lost its table of codes"
    table = {code: (tuple(int(s) for s in statuses.split(", ")),
                    meaning.startswith("reserved"))
             for code, statuses, meaning in rows}
    assert len(table) == len(rows), "a code twice in api.md's table"
    return table


def test_the_error_codes_are_one_list_in_code_contract_and_page():
    listed = {code.value: (code.statuses, code.reserved) for code in ErrorCode}
    assert CODE_ENUM == [code.value for code in ErrorCode]
    assert api_md_error_codes() == listed
    # Moderation sends the four it had reserved: none is reserved now.
    assert {code for code, (_, reserved) in listed.items() if reserved} == set()
    assert {"slow_mode", "banned", "closed", "duplicate"} <= set(listed)


def test_every_status_the_document_lists_has_a_code():
    statuses = {status for _, _, status in documented_responses() if status >= 400}
    for status in statuses:
        assert any(status in code.statuses and not code.reserved for code in ErrorCode), status
