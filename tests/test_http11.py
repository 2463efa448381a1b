"""HTTP/1.1 framing and connection limits (service/serve/framing.py, channel.py,
listen.py) over raw sockets.

Each attack is sent followed by a second request on the same connection:
the server must answer the attack alone, with a JSON 4xx, and close.
test_http11_load.py has the same limits under load.
"""

from __future__ import annotations

import ipaddress
import json
import time

import pytest
from conftest import SECRET
from rawhttp import (
    connect,
    exchange,
    parse_responses,
    post,
    read_until_closed,
    recv_response,
    request,
    server_connections,
)

from service.serve.listen import Limits, address_key
from service.web.auth import TokenSigner

SECOND = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
SMUGGLED = b"GET /contents/1/comments HTTP/1.1\r\nHost: x\r\n\r\n"
#: A hidden request that would write a comment if it were ever served.
SMUGGLED_POST = (b"POST /contents/1/comments HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nAuthorization: Bearer "
                 + TokenSigner(SECRET).mint(1, "user", 3600).encode()
                 + b"\r\nContent-Length: 20\r\n\r\n{\"body\": \"smuggled\"}")


@pytest.fixture
def database_url(sqlite_url):
    """Framing and sockets do not depend on the database: SQLite only."""
    return sqlite_url


@pytest.fixture
def serve(make_app, make_server):
    """``serve(**settings)``: (app, server) on a real server with short timeouts."""

    def make(**overrides):
        values = {"header_timeout": 2, "max_wait": 6, "default_wait": 5,
                  "channel_timeout": 8, "poll_interval": 0.2}
        values.update(overrides)
        app = make_app(**values)
        return app, make_server(app)

    return make


# -- framing: the smuggling corpus -------------------------------------------------------


def head(*fields, line=b"POST /contents/1/comments HTTP/1.1"):
    return b"\r\n".join([line, b"Host: x", *fields]) + b"\r\n\r\n"


CHUNKED_EMPTY = b"0\r\n\r\n"
ATTACKS = [
    ("CL then TE", head(b"Content-Length: %d" % (len(CHUNKED_EMPTY + SMUGGLED)),
                        b"Transfer-Encoding: chunked") + CHUNKED_EMPTY + SMUGGLED, 400),
    ("TE then CL", head(b"Transfer-Encoding: chunked", b"Content-Length: 4")
     + CHUNKED_EMPTY + SMUGGLED, 400),
    # A zero length with chunked is as ambiguous as any other (CL.0
    # smuggling: a front end that reads no body forwards the rest as a
    # request of its own); a check that only looks at non-zero lengths
    # lets it through.
    ("CL 0 then TE", head(b"Content-Length: 0", b"Transfer-Encoding: chunked")
     + CHUNKED_EMPTY + SMUGGLED_POST, 400),
    ("TE then CL 0", head(b"Transfer-Encoding: chunked", b"Content-Length: 0")
     + CHUNKED_EMPTY + SMUGGLED_POST, 400),
    ("CL 00 then TE", head(b"Content-Length: 00", b"Transfer-Encoding: chunked")
     + CHUNKED_EMPTY + SMUGGLED_POST, 400),
    ("TE then CL 00", head(b"Transfer-Encoding: chunked", b"Content-Length: 00")
     + CHUNKED_EMPTY + SMUGGLED_POST, 400),
    ("TE in HTTP/1.0", head(b"Transfer-Encoding: chunked", b"Content-Length: 5",
                            line=b"POST /contents/1/comments HTTP/1.0") + b"0\r\n\r\n", 400),
    ("Content-Length twice, same", head(b"Content-Length: 5", b"Content-Length: 5") + b"hello",
     400),
    ("Content-Length twice, different", head(b"Content-Length: 5", b"Content-Length: 50")
     + b"hello" + SMUGGLED, 400),
    ("Content-Length list", head(b"Content-Length: 5, 5") + b"hello", 400),
    ("TE xchunked", head(b"Transfer-Encoding: xchunked") + CHUNKED_EMPTY + SMUGGLED, 400),
    ("TE chunked, identity", head(b"Transfer-Encoding: chunked, identity")
     + CHUNKED_EMPTY + SMUGGLED, 400),
    ("TE identity", head(b"Transfer-Encoding: identity", b"Content-Length: 5") + b"hello", 400),
    ("TE twice", head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")
     + CHUNKED_EMPTY, 400),
    ("TE empty", head(b"Transfer-Encoding:", b"Content-Length: 5") + b"hello", 400),
    ("TE before colon", head(b"Transfer-Encoding : chunked") + CHUNKED_EMPTY, 400),
    ("Content-Length +10", head(b"Content-Length: +10") + b"0123456789", 400),
    ("Content-Length 1_0", head(b"Content-Length: 1_0") + b"0123456789", 400),
    ("Content-Length 0x10", head(b"Content-Length: 0x0a") + b"0123456789", 400),
    ("Content-Length -1", head(b"Content-Length: -1"), 400),
    ("Content-Length 1 0", head(b"Content-Length: 1 0") + b"0123456789", 400),
    ("obs-fold", head(b"X-Note: a", b" folded") + b"", 400),
    ("obs-fold of TE", head(b"Content-Length: 5", b"Transfer-Encoding:", b"\tchunked")
     + b"hello", 400),
    ("Host twice", head(b"Host: y", b"Content-Length: 0"), 400),
    ("HTTP/1.1 without Host", b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    ("bare CR", head(b"X-Note: a\rb", b"Content-Length: 0"), 400),
    ("300 KiB header", head(b"X-Big: " + b"a" * 300 * 1024, line=b"GET /healthz HTTP/1.1"), 431),
]


@pytest.mark.parametrize(("payload", "status"), [a[1:] for a in ATTACKS],
                         ids=[a[0] for a in ATTACKS])
def test_ambiguous_framing_is_refused_and_the_connection_closed(serve, payload, status):
    app, server = serve()
    responses, closed_after = exchange(server.adj.port, payload + SECOND, timeout=10)
    assert [r[0] for r in responses] == [status], responses  # nothing after it answered
    assert closed_after is not None, "the server kept the connection"
    _, headers, body = responses[0]
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    document = json.loads(body)
    assert set(document) == {"code", "title", "description"}
    assert document["code"] == {400: "invalid_request", 431: "too_large"}[status]
    with app.store.engine.connect() as conn:  # nothing smuggled reached the app
        assert conn.exec_driver_sql("SELECT count(*) FROM comments").scalar() == 0


@pytest.mark.parametrize("payload", [
    b"GET /healthz HTTP/1.1\nHost: x\n\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\n",
    b"GET /healthz HTTP/1.1\n",
], ids=["LF only", "LF in a field", "LF ending the head", "LF ending the request line"])
def test_bare_lf_is_answered_at_once(serve, payload):
    _, server = serve()
    responses, closed_after = exchange(server.adj.port, payload, timeout=10)
    assert closed_after is not None, "the server kept the connection"
    # 400 for the bare LF, not the 408 of a request left waiting for its CRLF.
    assert [r[0] for r in responses] == [400], responses


def test_good_framing_is_still_served(serve, token):
    port = serve()[1].adj.port
    auth = f"Authorization: {token(1)}".encode()
    body = b'{"body": "chunked"}'
    chunked = head(b"Transfer-Encoding: chunked", b"Content-Type: application/json", auth) \
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    padded = head(b"Content-Length:  18 ", b"Content-Type: application/json", auth) \
        + b'{"body": "spaced"}'
    http10 = b"GET /healthz HTTP/1.0\r\n\r\n"
    leading_crlf = b"\r\n" + SECOND
    with connect(port) as sock:  # pipelined on one keep-alive connection
        sock.sendall(chunked + padded + leading_crlf + SECOND + http10)
        data, closed_after = read_until_closed(sock, 3)
    assert [r[0] for r in parse_responses(data)] == [201, 201, 200, 200, 200]
    assert closed_after is not None  # HTTP/1.0: closed after its answer


def test_a_refused_request_still_being_sent_gets_its_answer(serve, token):
    """After a refusal the server half-closes and reads on (RFC 9112 §9.6):
    a client still sending reads the 413, not a reset."""
    port = serve()[1].adj.port
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(256)) + b"0\r\n\r\n"
    payload = head(b"Transfer-Encoding: chunked", b"Content-Type: application/json",
                   f"Authorization: {token(1)}".encode()) + body
    for _ in range(3):
        responses, closed_after = exchange(port, payload + SECOND)
        assert [r[0] for r in responses] == [413] and closed_after is not None


# -- slow and idle sockets -------------------------------------------------------------


@pytest.mark.slow
def test_slowloris_is_closed_while_a_held_poll_is_not_cut(serve, token):
    app, server = serve(header_timeout=2, max_wait=30, default_wait=30, channel_timeout=40)
    port = server.adj.port
    viewer = connect(port, timeout=30)
    viewer.sendall(b"GET /contents/1/comments?since=0&wait=30 HTTP/1.1\r\nHost: x\r\n\r\n")
    slow, silent = connect(port), connect(port)
    started = time.monotonic()
    slow.sendall(b"GET /healthz HTTP/1.1\r\n")
    answer = b""
    while time.monotonic() - started < 20:
        try:
            slow.send(b"X")
            slow.settimeout(0.5)
            answer += slow.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if answer and answer.endswith(b"}"):
            break
    slow_after = time.monotonic() - started
    data, silent_after = read_until_closed(silent, 20)
    assert silent_after is not None, "the silent connection was kept"
    silent_after += slow_after
    # The trickle did not keep it: 408 once header_timeout ran out, not before.
    assert [r[0] for r in parse_responses(answer)] == [408], answer
    assert slow_after >= 2, slow_after
    assert data == b"", data  # closed without an answer

    assert app.hub.budget.held == 1, "the held long-poll was cut"
    _, elapsed = post(port, token(1), 1, "news")
    status, _, body = recv_response(viewer)
    assert status == 200 and [c["body"] for c in json.loads(body)["comments"]] == ["news"]
    print(f"\nMEASURED slowloris closed after {slow_after:.2f} s (408), a silent connection "
          f"after {silent_after:.2f} s; the held poll answered after "
          f"{time.monotonic() - started:.2f} s; POST {elapsed * 1000:.0f} ms")
    viewer.close()
    slow.close()
    silent.close()


@pytest.mark.parametrize(("timeout", "delay", "payload"), [
    (1, 0, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"),
    (1, 0, head(b"Content-Length: 20", b"Content-Type: application/json") + b'{"body": '),
    (4, 3.8, b"GET /healthz HTTP/1.1\r\n"),
], ids=["head", "body", "first head after a pause"])
def test_an_incomplete_request_is_answered_408(serve, timeout, delay, payload):
    """Within header_timeout of its first byte -- for the first request of
    a connection, of connecting; a body, within as long again."""
    port = serve(header_timeout=timeout)[1].adj.port
    with connect(port) as sock:
        started = time.monotonic()
        time.sleep(delay)
        sock.sendall(payload)
        data, _ = read_until_closed(sock, 20)
    closed_after = time.monotonic() - started
    [(status, headers, body)] = parse_responses(data)
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["title"] == "Request Timeout"
    assert json.loads(body)["code"] == "timeout"
    assert closed_after >= timeout, closed_after
    if delay:
        # After a pause, counted from connecting: counted from the first
        # byte, it could not close before timeout + delay (3.8 s later than
        # the once-a-second check would).
        assert closed_after < timeout + delay, closed_after


@pytest.mark.slow
def test_idle_keep_alive_is_closed_after_channel_timeout(serve):
    port = serve(header_timeout=1, max_wait=2, default_wait=1, channel_timeout=4)[1].adj.port
    with connect(port) as sock:
        sock.sendall(SECOND)
        assert recv_response(sock)[0] == 200
        started = time.monotonic()
        time.sleep(3.5)  # beyond header_timeout: an idle connection is not a slow request
        sock.sendall(b"\r\n")  # an empty line between requests refreshes nothing
        data, _ = read_until_closed(sock, 20)
    closed_after = time.monotonic() - started
    assert data == b"", data
    # Refreshed by the empty line, it could not close before 3.5 + 4 s.
    assert 4 <= closed_after < 3.5 + 4, closed_after


def test_per_address_cap_refuses_excess_and_exempts_trusted_proxies(serve):
    port = serve(header_timeout=10, max_connections_per_address=5,
                 trusted_proxies="127.0.0.3")[1].adj.port
    held = [connect(port, "127.0.0.2") for _ in range(5)]
    wait_connections(port, "127.0.0.2", 5)  # accepted: the cap is taken
    responses, closed_after = exchange(port, SECOND, source="127.0.0.2")
    assert closed_after is not None
    assert [r[0] for r in responses] in ([503], []), responses  # 503, or reset before it
    for _, headers, body in responses:
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["code"] == "unavailable"
    assert request(port, "GET", "/healthz", source="127.0.0.4")[0] == 200
    proxy = [connect(port, "127.0.0.3") for _ in range(20)]
    for sock in proxy:
        sock.sendall(SECOND)
    for sock in proxy:
        assert recv_response(sock)[0] == 200
        sock.close()
    held.pop().close()
    wait_connections(port, "127.0.0.2", 4)  # the server has let it go
    assert request(port, "GET", "/healthz", source="127.0.0.2")[0] == 200
    for sock in held:
        sock.close()


def wait_connections(port, address, count, timeout=10):
    deadline = time.monotonic() + timeout
    while (have := server_connections(port, address)) != count:
        assert time.monotonic() < deadline, f"{have} connections from {address}, not {count}"
        time.sleep(0.02)


def test_address_keys():
    limits = Limits(max_per_address=10, trusted=("10.0.0.0/8", "::1"))
    assert address_key("192.0.2.1", limits) == ipaddress.ip_address("192.0.2.1")
    assert address_key("::ffff:192.0.2.1", limits) == ipaddress.ip_address("192.0.2.1")
    assert address_key("2001:db8:1:2::1", limits) == address_key("2001:db8:1:2:ff::9", limits)
    assert address_key("2001:db8:1:2::1", limits) != address_key("2001:db8:1:3::1", limits)
    assert address_key("10.1.2.3", limits) is None  # trusted
    assert address_key("::1", limits) is None
    assert address_key("192.0.2.1", Limits()) is None  # no cap
