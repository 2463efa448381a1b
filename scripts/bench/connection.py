"""One viewer's keep-alive HTTP/1.1 connection: an asyncio protocol on httptools.

A fan-out answers V viewers at once, and the bench reads each answer's
arrival clock in turn: whatever the client spends per answer is queueing
added to every latency measured, on the cores the server needs. aiohttp's
client costs about 0.2 ms of CPU per long-poll answer (response objects,
timers, pool bookkeeping), 0.2 s of the bench's own queue at 1,000 viewers.
This protocol hands bytes to httptools (llhttp, the parser aiohttp and
uvicorn use) and reads the clock when a response is complete: a few
microseconds per answer. One request at a time per connection, as a
long-polling viewer sends them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httptools

#: What a failed request raises: the connection is closed and may be opened again.
ERRORS = (OSError, TimeoutError, httptools.HttpParserError)

#: Seconds a connect may take. A server at its connection limit leaves new
#: ones in the kernel's queue, where SYN retries could keep one two minutes.
CONNECT_TIMEOUT = 10


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict  # lower-case name -> value (str)
    body: bytes
    arrived: float  # perf_counter() when the response was complete


class Connection(asyncio.Protocol):
    """A client connection; ``await get(target)`` answers a :class:`Response`."""

    def __init__(self, host_header):
        self._host = host_header
        self._transport = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter = None
        self._headers = {}
        self._body = []
        self.closed = False

    @classmethod
    async def open(cls, host, port):
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, conn = await loop.create_connection(lambda: cls(f"{host}:{port}"), host, port)
        return conn

    async def get(self, target, headers=None, *, timeout=None):
        """GET ``target`` (path and query); raises one of :data:`ERRORS` on
        failure, TimeoutError after ``timeout`` seconds (the connection closed).

        The timeout is a timer on this request's future, not ``wait_for``:
        no task per request, and a cancelled caller cancels the future itself.
        """
        if self.closed:
            raise ConnectionResetError("the connection is closed")
        lines = [f"GET {target} HTTP/1.1", f"Host: {self._host}"]
        if headers:
            lines += [f"{name}: {value}" for name, value in headers.items()]
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self._time_out)
        self._transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        try:
            return await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _time_out(self):
        self._fail(TimeoutError("no answer in time"))
        self.close()

    def close(self):
        if self._transport is not None:
            self._transport.close()
        self.closed = True

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport):
        self._transport = transport

    def data_received(self, data):
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    def connection_lost(self, exc):
        self.closed = True
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    # -- httptools callbacks ------------------------------------------------

    def on_header(self, name, value):
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body):
        self._body.append(body)

    def on_message_complete(self):
        response = Response(self._parser.get_status_code(), self._headers,
                            b"".join(self._body), time.perf_counter())
        self._headers, self._body = {}, []
        if not self._parser.should_keep_alive():
            self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(response)

    def _fail(self, exc):
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
