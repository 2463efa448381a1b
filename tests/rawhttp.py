"""Raw HTTP/1.1 over sockets, for tests that need bytes a client library
would never send, and for counting the server's sockets."""

from __future__ import annotations

import json
import os
import resource
import socket
import time

import pytest


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
