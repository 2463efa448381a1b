"""HTTP/1.1 framing (service/http11.py) over raw sockets.

Each attack is sent followed by a second request on the same connection:
the server must answer the attack alone, with a JSON 4xx, and close.
"""

from __future__ import annotations

import json

import pytest
from rawhttp import connect, exchange, parse_responses, read_until_closed

SECOND = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
SMUGGLED = b"GET /contents/1/comments HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def database_url(sqlite_url):
    """Framing and sockets do not depend on the database: SQLite only."""
    return sqlite_url


@pytest.fixture
def serve(make_app, make_server):
    """``serve(**settings)``: (app, server) on a real server."""

    def make(**overrides):
        app = make_app(**overrides)
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
    responses, closed_after = exchange(server.adj.port, payload + SECOND)
    assert closed_after is not None and closed_after < 2, "the server kept the connection"
    assert [r[0] for r in responses] == [status], responses  # nothing after it answered
    _, headers, body = responses[0]
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert set(json.loads(body)) == {"title", "description"}
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
    responses, closed_after = exchange(server.adj.port, payload, timeout=1)
    assert closed_after is not None, "no answer within 1 s"
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
