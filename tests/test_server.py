"""The contract over real sockets: the app on waitress, on SQLite and PostgreSQL."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.request

import pytest
from bad_requests import BAD_REQUESTS, JSON, assert_error_document, db_state, headers_for
from rawhttp import read_response
from test_hold import waiting

TIMEOUT = 10


# -- helpers -------------------------------------------------------------------


def call(server, method, path, body=None, headers=None, *, timeout=TIMEOUT):
    """One request on a fresh connection: (status, headers, body)."""
    conn = http.client.HTTPConnection(server.adj.host, server.adj.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def url(server, path):
    return f"http://{server.adj.host}:{server.adj.port}{path}"


def post(server, content_id, body, auth):
    request = urllib.request.Request(
        url(server, f"/contents/{content_id}/comments"),
        data=json.dumps({"body": body}).encode(),
        headers={"Content-Type": JSON, "Authorization": auth},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
        assert resp.status == 201
        location = resp.headers["Location"]
        comment = json.loads(resp.read())
    assert location.endswith(f"/contents/{content_id}/comments/{comment['id']}")
    return comment


def get(server, path):
    """GET over urllib: (headers, document)."""
    with urllib.request.urlopen(url(server, path), timeout=TIMEOUT) as resp:
        assert resp.status == 200
        body = resp.read()
        headers = resp.headers
    assert headers["Content-Type"] == JSON
    assert int(headers["Content-Length"]) == len(body)
    assert "chunked" not in (headers.get("Transfer-Encoding") or "")
    return headers, json.loads(body)


# -- the happy path ----------------------------------------------------------------


def test_post_read_page_delete_over_http(server, token):
    sent = [post(server, 1, f"comment {i} ✓ <b>", token(1 + i % 2)) for i in range(7)]
    assert [c["seq"] for c in sent] == list(range(1, 8))

    headers, page = get(server, "/contents/1/comments")
    assert headers["Cache-Control"] == "no-store"
    assert page["comments"] == sent and page["cursor"] == 7 and page["poll_after_ms"] == 0

    # Catch up page by page.
    cursor, seen = 0, []
    while True:
        _, page = get(server, f"/contents/1/comments?since={cursor}&limit=3&wait=0")
        if not page["comments"]:
            break
        seen.extend(page["comments"])
        cursor = page["cursor"]
    assert seen == sent and cursor == 7

    # The query-string form answers the same bytes.
    by_path = call(server, "GET", "/contents/1/comments?since=2&limit=3&wait=0")
    by_query = call(server, "GET", "/comments?content_id=1&since=2&limit=3&wait=0")
    assert by_path[0] == by_query[0] == 200 and by_path[2] == by_query[2]

    # Delete; a reader holding at the cursor gets the tombstone.
    status, _, body = call(
        server, "DELETE", f"/contents/1/comments/{sent[3]['id']}",
        headers={"Authorization": token(2)},
    )
    assert (status, body) == (204, b"")
    _, page = get(server, "/contents/1/comments?since=7&wait=5")
    [tombstone] = page["comments"]
    assert tombstone["id"] == sent[3]["id"] and tombstone["deleted"] is True
    assert tombstone["body"] is None and tombstone["seq"] == 8 and page["cursor"] == 8
    _, page = get(server, "/contents/1/comments")
    assert sent[3]["id"] not in [c["id"] for c in page["comments"]]
    assert len(page["comments"]) == 6 and page["cursor"] == 8


def test_held_poll_is_answered_by_a_post(server, app, token):
    post(server, 1, "before", token(1))
    answer = {}

    def viewer():
        answer["page"] = get(server, "/contents/1/comments?since=1&wait=10")[1]

    thread = threading.Thread(target=viewer)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    # Held (its slot taken and waiting in its feed) before the post, so the post wakes it.
    while app.hub.budget.held < 1 or not waiting(app.hub):
        assert thread.is_alive() and time.monotonic() < deadline, "the poll was not held"
        time.sleep(0.01)
    post(server, 1, "news", token(2))
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert [c["body"] for c in answer["page"]["comments"]] == ["news"]
    assert answer["page"]["cursor"] == 2
    assert app.hub.status()["answers"]["woken"] == 1  # by the post, not a timeout


# -- refusals ------------------------------------------------------------------------


def test_every_bad_request_is_refused_over_a_socket(server, app, token):
    seeded = post(server, 1, "existing", token(1))
    state = db_state(app)
    failures = []
    for case in BAD_REQUESTS:
        status, headers, body = call(
            server, case.method, case.target(seeded["id"]), body=case.body,
            headers=headers_for(case),
        )
        try:
            assert_error_document(status, headers["Content-Type"], body, case.status, case.id,
                                  code=case.code)
            assert int(headers["Content-Length"]) == len(body), f"{case.id}: Content-Length"
        except (AssertionError, ValueError) as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)
    assert db_state(app) == state
    _, page = get(server, "/contents/1/comments")
    assert page["comments"] == [seeded] and page["cursor"] == 1


def test_413_on_content_length_before_the_body_is_sent(server, token):
    with socket.create_connection((server.adj.host, server.adj.port), timeout=2) as sock:
        sock.sendall(
            b"POST /contents/1/comments HTTP/1.1\r\n"
            b"Host: localhost\r\n"
            b"Content-Type: application/json\r\n"
            + f"Authorization: {token(1)}\r\n".encode()
            + b"Content-Length: 10000000\r\n\r\n"
        )
        # The body is never sent: any answer came before it.
        try:
            status_line, headers, body = read_response(sock, time.monotonic() + 10)
        except TimeoutError:
            pytest.fail("no answer while the body was withheld")
    assert status_line.split()[1] == "413", status_line
    assert_error_document(413, headers.get("content-type"), body, 413, "raw 413",
                          code="too_large")


def _chunks(total, size=1000):
    yield b'{"body": "'
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)
    yield b'"}'


def test_chunked_post_over_the_limit_is_413(make_app, make_server, token):
    app = make_app(max_body_bytes=1024)
    server = make_server(app)
    headers = {"Content-Type": JSON, "Authorization": token(1)}

    status, resp_headers, body = call(server, "POST", "/contents/1/comments",
                                      body=_chunks(5000), headers=headers)
    assert_error_document(status, resp_headers["Content-Type"], body, 413, "chunked 5000",
                          code="too_large")
    assert db_state(app) == ([], [])

    # A chunked body under the limit is a comment like any other.
    status, _, body = call(server, "POST", "/contents/1/comments",
                           body=_chunks(100), headers=headers)
    assert status == 201, body
    assert json.loads(body)["body"] == "x" * 100


def test_chunked_post_over_64KiB_is_refused(server, app, token):
    """waitress answers 413 and closes as soon as the limit is crossed.

    A client still sending a large chunked body may see the connection
    reset before it reads the 413 (waitress does not linger on close);
    either way the body is refused and nothing is stored.
    """
    try:
        status, headers, body = call(
            server, "POST", "/contents/1/comments", body=_chunks(100_000),
            headers={"Content-Type": JSON, "Authorization": token(1)},
        )
    except (BrokenPipeError, ConnectionResetError):
        pass
    else:
        assert_error_document(status, headers["Content-Type"], body, 413, "chunked 100000",
                              code="too_large")
    assert db_state(app) == ([], [])
    # The server is unharmed: the next request is served.
    assert post(server, 1, "after", token(1))["body"] == "after"


# -- HTTP framing ----------------------------------------------------------------------


def test_responses_carry_content_length_not_chunked(server, token):
    post(server, 1, "hello", token(1))
    for method, path, body, headers in (
        ("GET", "/contents/1/comments", None, {}),
        ("GET", "/contents/1/comments?since=0&wait=0", None, {}),
        ("GET", "/comments?content_id=1", None, {}),
        ("GET", "/contents/1/comments?since=1&wait=0", None, {}),
        ("GET", "/healthz", None, {}),
        ("POST", "/contents/1/comments", b'{"body": "x"}',
         {"Content-Type": JSON, "Authorization": token(1)}),
        ("GET", "/contents/1/comments?limit=0", None, {}),
    ):
        status, resp_headers, resp_body = call(server, method, path, body, headers)
        assert status in (200, 201, 400)
        assert resp_headers["Transfer-Encoding"] is None, path
        assert int(resp_headers["Content-Length"]) == len(resp_body), path
        json.loads(resp_body)


def test_http_1_0_gets_a_complete_response(server, token):
    post(server, 1, "for an old client", token(1))
    for request in (
        b"GET /contents/1/comments?wait=0 HTTP/1.0\r\n\r\n",
        b"GET /contents/1/comments?since=1&wait=0 HTTP/1.0\r\nHost: localhost\r\n\r\n",
        b"GET /comments?content_id=1&since=0&wait=0 HTTP/1.0\r\n\r\n",
    ):
        with socket.create_connection((server.adj.host, server.adj.port), timeout=5) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):  # HTTP/1.0: the server closes when done
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.") and lines[0].split()[1] == "200", lines[0]
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        assert int(headers["content-length"]) == len(body)
        assert "transfer-encoding" not in headers
        page = json.loads(body)
        assert page["content_id"] == 1 and page["cursor"] == 1


def test_http_1_0_post(server, token):
    payload = b'{"body": "posted over HTTP/1.0"}'
    request = (
        b"POST /contents/1/comments HTTP/1.0\r\n"
        b"Content-Type: application/json\r\n"
        + f"Authorization: {token(1)}\r\n".encode()
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    with socket.create_connection((server.adj.host, server.adj.port), timeout=5) as sock:
        sock.sendall(request)
        status_line, headers, body = read_response(sock, time.monotonic() + 5)
    assert status_line.split()[1] == "201", status_line
    assert json.loads(body)["body"] == "posted over HTTP/1.0"


def test_keep_alive_connection_serves_several_requests(server, token):
    conn = http.client.HTTPConnection(server.adj.host, server.adj.port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/contents/1/comments?wait=0")
        first = conn.getresponse()
        assert first.status == 200 and json.loads(first.read())["cursor"] == 0
        sock = conn.sock
        assert sock is not None, "the server closed a keep-alive connection"

        conn.request("POST", "/contents/1/comments", body=b'{"body": "same connection"}',
                     headers={"Content-Type": JSON, "Authorization": token(1)})
        second = conn.getresponse()
        assert second.status == 201 and json.loads(second.read())["seq"] == 1
        assert conn.sock is sock

        conn.request("POST", "/contents/1/comments", body=b'{"body": ""}',
                     headers={"Content-Type": JSON, "Authorization": token(1)})
        third = conn.getresponse()
        assert third.status == 400 and "title" in json.loads(third.read())
        assert conn.sock is sock

        # Held until this content's feed has the comment (it may already).
        conn.request("GET", "/contents/1/comments?since=0&wait=5")
        fourth = conn.getresponse()
        page = json.loads(fourth.read())
        assert fourth.status == 200 and page["cursor"] == 1
        assert [c["body"] for c in page["comments"]] == ["same connection"]
        assert conn.sock is sock
    finally:
        conn.close()
