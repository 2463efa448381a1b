"""Raw HTTP/1.x over sockets, for tests where the bytes on the wire are the point.

Many held viewers multiplexed with ``selectors`` from one test thread
(:class:`Exchange`, :func:`collect`); one response read off a plain socket
(:func:`read_response`); requests a client library would never send
(:func:`exchange`, :func:`request`); and counting the server's sockets and
open files. Tests import it as ``from rawhttp import …``.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import time

import pytest


class Response:
    def __init__(self, version, status, headers, body):
        self.version = version
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.version} {self.status} {self.body[:200]!r}>"


def parse_response(buffer):
    """A complete response at the start of ``buffer``, and its length; or None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    version, status, _ = (lines[0] + " ").split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert "content-length" in headers, f"no Content-Length: {lines}"
    length = int(headers["content-length"])
    if len(buffer) < end + 4 + length:
        return None
    body = bytes(buffer[end + 4:end + 4 + length])
    return Response(version, int(status), headers, body), end + 4 + length


class Exchange:
    """One client connection: send a request, later collect its response."""

    def __init__(self, port):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = bytearray()
        self.response = None
        self.sent_at = self.done_at = None
        self.eof = False

    def send(self, target, *, method="GET", headers=None, body=b"", version="HTTP/1.1"):
        lines = [f"{method} {target} {version}", f"Host: 127.0.0.1:{self.port}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.buffer.clear()
        self.response = self.done_at = None
        self.sent_at = time.monotonic()
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return self

    @property
    def elapsed(self):
        return self.done_at - self.sent_at

    def hung_up(self, timeout):
        """True if the server closes the connection (after any response)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False

    def close(self):
        self.sock.close()


def collect(exchanges, timeout):
    """Read until every exchange has its response (or its server hung up).

    Returns the exchanges still unanswered when ``timeout`` ran out.
    """
    pending = [x for x in exchanges if x.response is None and not x.eof]
    selector = selectors.DefaultSelector()
    for x in pending:
        selector.register(x.sock, selectors.EVENT_READ, x)
    deadline = time.monotonic() + timeout
    try:
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                x = key.data
                try:
                    data = x.sock.recv(65536)
                except OSError:
                    data = b""
                now = time.monotonic()
                if not data:
                    x.eof = True
                    selector.unregister(x.sock)
                    continue
                x.buffer += data
                parsed = parse_response(x.buffer)
                if parsed is not None:
                    x.response, used = parsed
                    del x.buffer[:used]
                    x.done_at = now
                    selector.unregister(x.sock)
    finally:
        selector.close()
    return [x for x in exchanges if x.response is None and not x.eof]


def read_response(sock, deadline):
    """Read one HTTP response off a raw socket: (status line, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", -1))
    while length >= 0 and len(body) < length or length < 0:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return lines[0], headers, body


# -- requests a client library would never send, and socket counts ----------


def connect(port, source=None, timeout=5.0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if source:
        sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_until_closed(sock, timeout):
    """What the server sends until it closes: (data, seconds to close or None)."""
    started = time.monotonic()
    data = b""
    while True:
        sock.settimeout(max(0.01, started + timeout - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, None
        except ConnectionResetError:
            return data, time.monotonic() - started
        if not chunk:
            return data, time.monotonic() - started
        data += chunk


def parse_responses(data):
    """Every complete response in ``data``: [(status, headers, body)]."""
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        if len(rest) < length:
            break
        responses.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return responses


def recv_response(sock, timeout=3.0):
    """The next complete response on a keep-alive connection."""
    sock.settimeout(timeout)
    data = b""
    while not (responses := parse_responses(data)):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return responses[0]


def exchange(port, payload, timeout=3.0, source=None):
    with connect(port, source) as sock:
        sock.sendall(payload)
        data, closed_after = read_until_closed(sock, timeout)
    return parse_responses(data), closed_after


def request(port, method, path, body=b"", headers=(), source=None, timeout=5.0):
    """One request on its own connection (Connection: close): (status, document, seconds)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: x", "Connection: close", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    started = time.monotonic()
    [(status, _, raw)], _ = exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body,
                                     timeout, source)
    return status, json.loads(raw), time.monotonic() - started


def post(port, token, content_id, text, source=None):
    status, doc, elapsed = request(port, "POST", f"/contents/{content_id}/comments",
                                   json.dumps({"body": text}).encode(),
                                   [f"Authorization: {token}"], source)
    assert status == 201, doc
    return doc, elapsed


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def open_sockets():
    """This process's open sockets (server and clients share it): unlike
    :func:`open_fds`, not moved by a database pool that grew meanwhile."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # closed since the listing
            pass
    return count


def server_connections(port, client=None):
    """Connection sockets (not the listening one) the server holds open,
    all or those from the ``client`` address.

    Server and clients share this process; the server's ends are the TCP
    sockets whose local port is the server's. A socket the server closed
    has no inode any more, whatever its TCP state.
    """
    remote = None if client is None else socket.inet_aton(client)[::-1].hex().upper()
    inodes = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if (local_port == port and fields[3] != "0A" and fields[9] != "0"
                    and remote in (None, fields[2].split(":")[0])):
                inodes.add(fields[9])
    return len(inodes)


def want_fds(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
