"""HTTP/1.1 framing and connection limits for a waitress that faces clients.

waitress 3.0.2, on its own, lets a directly exposed process be misled or exhausted:

* it reads a request that carries both ``Content-Length`` and
  ``Transfer-Encoding: chunked`` as chunked and keeps the connection open,
  so bytes hidden in the declared body become the next request (request
  smuggling, Pylons/waitress#464); after any refused request it goes on
  parsing the bytes that follow;
* it waits for CRLF CRLF only, so a request whose lines end in a bare LF
  is never answered and holds its connection until the channel timeout;
* every byte received refreshes a connection's inactivity timer, so a
  client sending a header byte every few seconds (slowloris) is never
  closed, and connections that send nothing are kept ``channel_timeout``;
  a connection whose client stops reading is never closed at all;
* one client address may take every connection up to ``connection_limit``.

The classes here guard against that by subclassing waitress's own:
:class:`RequestParser` checks the framing (RFC 9112) before waitress reads
it, :class:`GuardedChannel` reads nothing after a refusal as a request
(and closes gracefully, so that the client reads the refusal) and keeps
the clocks of one connection, and :class:`GuardMixin` (on the server) caps the
connections of one client address at accept and closes connections that
run out of time. A request being served -- a long-poll held by the app --
is never cut by any of these limits.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field

from waitress.adjustments import Adjustments
from waitress.channel import ClientDisconnected, HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher
from waitress.utilities import BadRequest, Error

logger = logging.getLogger(__name__)

#: A LF not preceded by CR. RFC 9112 §2.2 lets a recipient accept one as a
#: line terminator, but a proxy in front that does not would read the
#: same bytes as different fields; the request is refused instead.
_BARE_LF = re.compile(rb"(?<!\r)\n")
#: ``Content-Length = 1*DIGIT`` (RFC 9110 §8.6): no sign, no separators.
_DIGITS = re.compile(rb"[0-9]+")

#: Seconds a connection that refused a request keeps reading (and dropping)
#: what the client still sends after the answer, before it is closed.
LINGER = 2.0

#: Connections accepted per readable event of the listening socket
#: (waitress accepts one), so that a reconnect storm drains in few loop turns.
ACCEPT_BATCH = 64

#: Seconds between two log lines about refused connections.
REFUSAL_LOG_INTERVAL = 60.0


class RequestTimeout(Error):
    code = 408
    reason = "Request Timeout"


# -- request framing (RFC 9112) -----------------------------------------------


def check_framing(first_line, fields):
    """Refuse (``ParsingError``, answered 400) a request head whose framing
    is ambiguous; ``fields`` are the raw field lines after the request-line.

    Of the fields that frame the body only one interpretation may be
    possible, whoever reads them: a proxy in front and this server must
    agree on where a request ends.
    """
    lengths, codings, hosts = [], [], 0
    for line in fields.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 §5.2: a server MUST reject obs-fold with 400 (or
            # unfold it); waitress unfolds it.
            raise ParsingError("obsolete line folding in a header field (RFC 9112 §5.2)")
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"content-length":
            lengths.append(value.strip(b" \t"))
        elif name == b"transfer-encoding":
            codings.append(value.strip(b" \t"))
        elif name == b"host":
            hosts += 1
    http11 = first_line.rstrip().endswith(b" HTTP/1.1")
    # RFC 9112 §3.2: 400 for an HTTP/1.1 request without Host, and for
    # any request with more than one.
    if hosts > 1:
        raise ParsingError("more than one Host header field (RFC 9112 §3.2)")
    if http11 and not hosts:
        raise ParsingError("an HTTP/1.1 request needs a Host header field (RFC 9112 §3.2)")
    if codings:
        if not http11:
            # RFC 9112 §6.1: faulty framing; waitress would ignore the field
            # and read Content-Length.
            raise ParsingError("Transfer-Encoding in a request that is not HTTP/1.1 "
                               "(RFC 9112 §6.1)")
        if lengths:
            # RFC 9112 §6.1: the server MAY reject, and MUST close after.
            raise ParsingError("both Content-Length and Transfer-Encoding (RFC 9112 §6.1)")
        if len(codings) > 1 or codings[0].lower() != b"chunked":
            # RFC 9112 §6.3: chunked not final is 400; a coding we do not
            # implement would be 501 (§6.1), but we close either way and
            # one answer for any Transfer-Encoding but chunked is simpler.
            raise ParsingError("Transfer-Encoding must be exactly chunked (RFC 9112 §6.1)")
    if len(lengths) > 1:
        # RFC 9112 §6.3: an invalid Content-Length is an unrecoverable
        # framing error; repeated fields are refused even when they agree.
        raise ParsingError("more than one Content-Length (RFC 9112 §6.3)")
    if lengths and not _DIGITS.fullmatch(lengths[0]):
        raise ParsingError("Content-Length must be decimal digits only (RFC 9110 §8.6)")


class RequestParser(HTTPRequestParser):
    """waitress's parser, refusing ambiguous framing and bare LF.

    Once a request is refused (``error`` set) the parser claims every byte
    it is given, so waitress never reads what follows as another request.
    """

    def received(self, data):
        if self.completed:
            return 0
        if self.body_rcv is None and b"\n" in data:
            # Still in the head: look for a bare LF in its new bytes (the
            # look-behind sees the byte received before them).
            head = self.header_plus + data
            end = head.find(b"\r\n\r\n")
            if _BARE_LF.search(head, len(self.header_plus), end if end >= 0 else len(head)):
                self.refuse(BadRequest("bare LF in the request head: lines end with CRLF "
                                       "(RFC 9112 §2.2)"))
                return len(data)
        consumed = super().received(data)
        if self.error is not None:
            return len(data)
        return consumed

    def parse_header(self, header_plus):
        end = header_plus.find(b"\r\n")
        if end >= 0:
            check_framing(header_plus[:end], header_plus[end + 2:])
        super().parse_header(header_plus)

    def refuse(self, error):
        """Complete this request as the refusal ``error`` (answered, then closed)."""
        # The fields an error task reads, as waitress fills them for its 431.
        self.parse_header(b"GET / HTTP/1.0\r\n")
        self.error = error
        self.headers_finished = self.completed = True


# -- one connection ---------------------------------------------------------------


class GuardedChannel(HTTPChannel):
    """A waitress channel that stops reading after a refused request and
    keeps the deadlines of its connection (see :meth:`enforce`).

    Its server must be a :class:`GuardMixin` server (``server.limits``).
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


# -- the server ----------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What :class:`GuardMixin` enforces."""

    #: Seconds within which a request's head (and then its body) must
    #: arrive; a new connection's first request head counts from connecting.
    header_timeout: float = 30.0
    #: Seconds a connection with no request in progress is kept, and that
    #: output a client does not read is kept waiting.
    idle_timeout: float = 120.0
    #: Most connections from one client address (an IPv6 /64); None: no cap.
    max_per_address: int | None = None
    #: Networks exempt from the cap (``"127.0.0.1"``, ``"10.0.0.0/8"``):
    #: a proxy or cache in front carries many clients' connections.
    trusted: tuple[str, ...] = ()
    trusted_networks: tuple = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self):
        networks = tuple(ipaddress.ip_network(t, strict=False) for t in self.trusted)
        object.__setattr__(self, "trusted_networks", networks)


def address_key(host, limits):
    """What a connection from ``host`` counts against; None when uncapped."""
    if limits.max_per_address is None:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # not an IP peer (a Unix socket)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in limits.trusted_networks):
        return None
    if ip.version == 6:
        # One client usually holds a whole /64.
        return ipaddress.ip_network((ip, 64), strict=False)
    return ip


class GuardMixin:
    """For a waitress ``BaseWSGIServer`` subclass: caps connections per
    client address at accept, and closes connections that ran out of time
    at each maintenance pass (every ``cleanup_interval`` seconds).

    Takes ``limits`` (:class:`Limits`) and optionally ``connections`` (the
    per-address counts, shared by the servers of one process).
    """

    #: Guards every server's ``connections`` (counted on accept and close).
    connections_lock = threading.Lock()

    def __init__(self, application, *args, limits=None, connections=None, **kwargs):
        self.limits = limits or Limits()
        self.connections = {} if connections is None else connections
        self.refused_connections = 0
        self.next_refusal_log = 0.0
        super().__init__(application, *args, **kwargs)

    def handle_accept(self):
        # waitress's handle_accept, accepting a batch, with the cap.
        for _ in range(ACCEPT_BATCH):
            if len(self._map) >= self.adj.connection_limit:
                return
            try:
                pair = self.accept()
            except OSError:
                if self.adj.log_socket_errors:
                    self.logger.warning("server accept() threw an exception", exc_info=True)
                return
            if pair is None:
                return
            sock, addr = pair
            try:
                self.set_socket_options(sock)
            except OSError:  # the client is already gone
                sock.close()
                continue
            addr = self.fix_addr(addr)
            key = address_key(addr[0], self.limits) if isinstance(addr, tuple) else None
            if key is not None and not self.claim_address(key):
                self.refuse_connection(sock, addr)
                continue
            try:
                channel = self.channel_class(self, sock, addr, self.adj, map=self._map)
            except OSError:  # the client is already gone
                sock.close()
                if key is not None:
                    self.release_address(key)
                continue
            channel.address_key = key

    def claim_address(self, key):
        with self.connections_lock:
            count = self.connections.get(key, 0)
            if count >= self.limits.max_per_address:
                return False
            self.connections[key] = count + 1
            return True

    def release_address(self, key):
        with self.connections_lock:
            count = self.connections.pop(key, 0) - 1
            if count > 0:
                self.connections[key] = count

    def refuse_connection(self, sock, addr):
        """Answer 503 and close, at once: usually before the client's request
        arrives (unread, it would turn the close into a reset)."""
        body = json.dumps({  # the API's error document
            "title": "Service Unavailable",
            "description": f"more than {self.limits.max_per_address} connections from one address",
        }).encode()
        try:
            sock.setblocking(False)
            sock.send(b"HTTP/1.1 503 Service Unavailable\r\n"
                      b"Connection: close\r\n"
                      b"Content-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        except OSError:
            pass
        finally:
            sock.close()
        self.refused_connections += 1
        now = time.monotonic()
        if now >= self.next_refusal_log:
            self.next_refusal_log = now + REFUSAL_LOG_INTERVAL
            logger.warning(
                "refused connection from %s: more than %d connections from one address "
                "(%d refused so far)", addr[0], self.limits.max_per_address,
                self.refused_connections,
            )

    def maintenance(self, now):
        # Replaces waitress's, whose clock (time.time() in ``now``) every
        # received byte refreshes.
        now = time.monotonic()
        for channel in list(self.active_channels.values()):
            channel.enforce(now, self.limits)


class GuardedServer(GuardMixin, TcpWSGIServer):
    channel_class = GuardedChannel


def create_server(server_class, application, limits, **options):
    """waitress's ``create_server`` for TCP, with ``server_class`` (a
    :class:`GuardedServer`) on every listening address."""
    adj = Adjustments(**options)
    socket_map = {}
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    connections = {}
    shared = {"dispatcher": dispatcher, "adj": adj, "limits": limits,
              "connections": connections}
    if adj.sockets:  # pre-bound (a worker's SO_REUSEPORT socket)
        servers = [
            server_class(application, socket_map, True, sock, bind_socket=False,
                         sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()),
                         **shared)
            for sock in adj.sockets
        ]
    else:
        servers = [server_class(application, socket_map, sockinfo=sockinfo, **shared)
                   for sockinfo in adj.listen]
    if len(servers) == 1:
        return servers[0]
    listening = [(server.effective_host, server.effective_port) for server in servers]
    return MultiSocketServer(socket_map, adj, listening, dispatcher, servers[-1].log_info)
