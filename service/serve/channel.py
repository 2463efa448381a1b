"""One guarded connection: the clocks of a connection, and what it reads
after a refusal.

waitress 3.0.2, on its own, lets a client that faces it directly exhaust
it one connection at a time:

* every byte received refreshes a connection's inactivity timer, so a
  client sending a header byte every few seconds (slowloris) is never
  closed, and connections that send nothing are kept ``channel_timeout``;
* a connection whose client stops reading is never closed at all;
* after a refused request it goes on parsing the bytes that follow, and
  its close can reset the connection before the client reads the refusal.

:class:`GuardedChannel` subclasses waitress's channel: it parses with
:class:`~.framing.RequestParser`, reads nothing after a refusal as a
request (and closes gracefully, so that the client reads the refusal),
and keeps the deadlines of its connection, which its server's
maintenance pass enforces (:mod:`.listen`). A request being served -- a
long-poll held by the app -- is never cut. :class:`Channel` is the
service's: waitress's own refusals answered with the service's JSON
error document.
"""

from __future__ import annotations

import socket
import time

from waitress.channel import ClientDisconnected, HTTPChannel
from waitress.task import ErrorTask
from waitress.utilities import Error

from ..common.errors import ERROR_MEDIA_TYPE, code_for_status, error_document
from .framing import RequestParser

#: Seconds a connection that refused a request keeps reading (and dropping)
#: what the client still sends after the answer, before it is closed.
LINGER = 2.0


class RequestTimeout(Error):
    code = 408
    reason = "Request Timeout"


class GuardedChannel(HTTPChannel):
    """A waitress channel that stops reading after a refused request and
    keeps the deadlines of its connection (see :meth:`enforce`).

    Its server must be a :class:`~.listen.GuardMixin` server (``server.limits``).
    """

    parser_class = RequestParser

    refused = False  # a refused request was read: nothing after it is
    lingers = False  # ...and the client may still be sending it (see handle_close)
    linger_until = None  # monotonic end of a lingering close
    writing = False  # in handle_write()
    serving = False  # a worker thread is in service()
    address_key = None  # the per-address count this connection holds
    idle_since = None  # monotonic end of the last response; None before one

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map=map)
        self.opened_at = now = time.monotonic()
        # The current request must be received by ``deadline`` (monotonic);
        # ``timed`` is the (request, begun, headers_finished) it was set for.
        self.deadline = now + server.limits.header_timeout
        self.timed = None

    # wasyncore asks a channel closed by maintenance() whether to poll it.
    def readable(self):
        if self.socket is None:
            return False
        return self.linger_until is not None or super().readable()

    def writable(self):
        if self.socket is None:
            return False
        if self.linger_until is not None:
            return self.will_close
        return super().writable()

    def handle_write(self):
        self.writing = True
        try:
            super().handle_write()
        finally:
            self.writing = False

    def handle_close(self):
        # RFC 9112 §9.6: once the answer to a refused request is sent, the
        # client may still be sending that request; a close with unread
        # bytes resets the connection, which can destroy the answer before
        # the client reads it. Half-close instead, and read and drop what
        # still comes until the client closes, or for LINGER seconds.
        if (self.writing and self.lingers and self.linger_until is None
                and self.socket is not None and not self.total_outbufs_len):
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self.will_close = self.close_when_flushed = False
                self.linger_until = time.monotonic() + LINGER
                return
        super().handle_close()

    def received(self, data):
        if self.refused:
            return False  # read and dropped: the connection closes after the refusal
        result = super().received(data)
        with self.requests_lock:
            if self.requests and self.requests[-1].error is not None:
                self.refused = self.lingers = True
        request = self.request
        if request is not None:
            state = (request, begun(request), request.headers_finished)
            if state != self.timed:
                # A request began, or its head ended: its head, then its
                # body, must arrive within header_timeout. The first
                # request's head counts from the connection opening.
                self.timed = state
                now = time.monotonic()
                start = now
                if self.idle_since is None and not request.headers_finished:
                    start = self.opened_at
                self.deadline = start + self.server.limits.header_timeout
        return result

    def service(self):
        self.serving = True
        try:
            super().service()
        finally:
            now = time.monotonic()
            self.idle_since = now
            # A request that began while this one was served starts its
            # clock now, not from its first byte.
            self.deadline = max(self.deadline, now + self.server.limits.header_timeout)
            self.serving = False

    def del_channel(self, map=None):
        super().del_channel(map)
        key, self.address_key = self.address_key, None
        if key is not None:
            self.server.release_address(key)

    def enforce(self, now, limits):
        """Close this connection if it has run out of time (main thread only).

        * A lingering close ends after LINGER seconds.
        * A request being served (a held long-poll) is never cut.
        * Output the client does not read, or a close that cannot be
          flushed, is given up after ``idle_timeout`` without progress.
        * A request must be received within ``header_timeout`` (408).
        * A connection with no request is closed after ``idle_timeout``.
        """
        if self.linger_until is not None:
            if now >= self.linger_until:
                self.handle_close()
            return
        if self.requests or self.serving or self.socket is None:
            return
        if self.total_outbufs_len or self.will_close or self.close_when_flushed:
            # waitress's last_activity is time.time() of the last byte sent
            # or received; nothing is received while output is pending.
            if time.time() - self.last_activity >= limits.idle_timeout:
                self.handle_close()
            return
        request = self.request
        if (request is not None and begun(request)) or self.idle_since is None:
            if now >= self.deadline:
                self.time_out()
        elif now - self.idle_since >= limits.idle_timeout:
            self.handle_close()

    def time_out(self):
        """Answer 408 to a request partly received, then close; just close
        a connection that sent no request."""
        request, self.request = self.request, None
        if request is None or not begun(request):
            self.handle_close()
            return
        request.close()
        refusal = self.parser_class(self.adj)
        refusal.refuse(RequestTimeout(
            f"the request was not received within {self.server.limits.header_timeout:g} s"
        ))
        task = self.error_task_class(self, refusal)
        try:
            task.service()  # a small answer to a socket that sends, not reads: sent at once
        except (ClientDisconnected, OSError):
            self.handle_close()
            return
        self.refused = True
        self.close_when_flushed = True


def begun(request):
    """Whether a request has more than the empty lines RFC 9112 §2.2 lets a
    client send between requests (which leave the connection idle)."""
    return request.headers_finished or bool(request.header_plus.lstrip())


# -- the service's channel ---------------------------------------------------


class JSONErrorTask(ErrorTask):
    """waitress's own refusals as the API's JSON errors, each with the code
    of its status: 400 ``invalid_request``, 408 ``timeout``, 413 and 431
    ``too_large``, 500 (the app failed outside Falcon) ``internal_error``."""

    def execute(self):
        error = self.request.error
        body = error_document(code_for_status(error.code), error.reason, error.body)
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", ERROR_MEDIA_TYPE))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class Channel(GuardedChannel):
    """The service's connection: guarded, and refusing in JSON."""

    error_task_class = JSONErrorTask
