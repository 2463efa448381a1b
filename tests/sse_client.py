"""A server-sent events client over a raw socket, for tests.

It sends one request, reads the head, undoes chunked framing as bytes
arrive, and splits the body into events, so a test sees exactly when each
event left the server and how it was framed.
"""

from __future__ import annotations

import json
import socket
import time


class Event:
    """One event. ``event`` is its type as ``EventSource`` dispatches it:
    the ``event:`` field, else ``"message"`` (what ``onmessage`` gets), or
    None for a block without data (never dispatched)."""

    def __init__(self, block):
        self.raw = block
        self.id = self.event = None
        self.comments = []
        data = []
        for line in block.decode().split("\n"):
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "id":
                self.id = int(value) if value.isdigit() else value
            elif name in ("event", "retry"):
                setattr(self, name, value)
        self.data = "\n".join(data) if data else None
        if self.event is None and self.data is not None:
            self.event = "message"

    @property
    def json(self):
        return json.loads(self.data)

    def __repr__(self):
        return f"<Event {self.event} id={self.id} {self.data!r:.80}>"


class SSEClient:
    def __init__(self, port, path, headers=None, version="HTTP/1.1", timeout=10, sock=None):
        """A stream of ``path`` on a new connection to ``port``, or on
        ``sock``, a connection already open to it (a known worker's)."""
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
        lines = [f"GET {path} {version}", f"Host: 127.0.0.1:{port}",
                 "Accept: text/event-stream"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._raw = bytearray()   # received, framing not yet undone
        self._body = bytearray()  # body bytes not yet split into events
        self.status = None
        self.headers = {}
        self.chunked = False
        self.eof = False          # the server closed the connection
        self.ended = False        # the body ended cleanly (last chunk, or EOF)
        self.first_chunk = None

    # -- reading -------------------------------------------------------------

    def _fill(self, deadline):
        timeout = deadline - time.monotonic()
        if timeout <= 0 or self.eof:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            data = b""
        if not data:
            self.eof = True
            if not self.chunked:
                self.ended = True
            return False
        self._raw += data
        return True

    def head(self, timeout=5):
        """Read the status line and headers; returns the status."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self._raw:
            if not self._fill(deadline):
                raise AssertionError(f"no response head within {timeout} s: {bytes(self._raw)!r}")
        end = self._raw.index(b"\r\n\r\n")
        lines = self._raw[:end].decode("latin-1").split("\r\n")
        del self._raw[:end + 4]
        self.status = int(lines[0].split(" ")[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        return self.status

    def body(self, timeout=5):
        """The whole body of a response with Content-Length (an error)."""
        length = int(self.headers["content-length"])
        deadline = time.monotonic() + timeout
        while len(self._raw) < length and self._fill(deadline):
            pass
        return bytes(self._raw[:length])

    def _unframe(self):
        if not self.chunked:
            self._body += self._raw
            self._raw.clear()
            return
        while not self.ended:
            line_end = self._raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self._raw[:line_end]).split(b";")[0], 16)
            if len(self._raw) < line_end + 2 + size + 2:
                return
            chunk = bytes(self._raw[line_end + 2:line_end + 2 + size])
            del self._raw[:line_end + 2 + size + 2]
            if size == 0:
                self.ended = True
                return
            if self.first_chunk is None:
                self.first_chunk = chunk
            self._body += chunk

    def next_event(self, timeout=5):
        """The next event, or None if none came within ``timeout`` or the body ended."""
        deadline = time.monotonic() + timeout
        while True:
            self._unframe()
            if self.first_chunk is None and not self.chunked and self._body:
                self.first_chunk = bytes(self._body)
            end = self._body.find(b"\n\n")
            if end >= 0:
                block = bytes(self._body[:end])
                del self._body[:end + 2]
                return Event(block)
            if self.ended or not self._fill(deadline):
                return None

    def events(self, count, timeout=5, kinds=("message", "reset")):
        """The next ``count`` events of ``kinds`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        found = []
        while len(found) < count:
            event = self.next_event(max(0.0, deadline - time.monotonic()))
            if event is None:
                raise AssertionError(f"got {found} of {count} events within {timeout} s")
            if event.event in kinds:
                found.append(event)
        return found

    def until_end(self, timeout=10):
        """Every event until the body ends; fails if it does not end in time."""
        deadline = time.monotonic() + timeout
        found = []
        while True:
            event = self.next_event(max(0.0, deadline - time.monotonic()))
            if event is not None:
                found.append(event)
                continue
            assert self.ended, f"stream still open after {timeout} s"
            return found

    def silent_for(self, seconds):
        """True if not a byte arrives for ``seconds``."""
        before = len(self._raw)
        deadline = time.monotonic() + seconds
        while self._fill(deadline):
            pass
        return len(self._raw) == before and not self.eof

    def close(self):
        self.sock.close()
