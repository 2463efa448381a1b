"""The listening server and its limits: connections per client address,
and the pass that closes connections out of time.

waitress 3.0.2, on its own, lets one client address take every connection
up to ``connection_limit``, and its maintenance pass times connections by
their last byte (which a slowloris client keeps fresh).

:class:`GuardMixin` subclasses waitress's server: it caps the connections
of one client address at accept (answering 503 with the service's JSON
error document beyond the cap), and at each maintenance pass has every
connection enforce its own deadlines (:meth:`.channel.GuardedChannel.enforce`)
under the :class:`Limits`. :class:`Server` is the service's, with its
:class:`~.channel.Channel`; :func:`create_server` is waitress's own for TCP
with a guarded server on every listening address.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, field

from waitress.adjustments import Adjustments
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

from ..common.errors import ERROR_MEDIA_TYPE, ErrorCode, error_document
from .channel import Channel, GuardedChannel

logger = logging.getLogger(__name__)

#: Connections accepted per readable event of the listening socket
#: (waitress accepts one), so that a reconnect storm drains in few loop turns.
ACCEPT_BATCH = 64

#: Seconds between two log lines about refused connections.
REFUSAL_LOG_INTERVAL = 60.0


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
    per-address counts, shared by the servers of one process). Its
    ``channel_class`` must be a :class:`~.channel.GuardedChannel`.
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
        body = error_document(
            ErrorCode.UNAVAILABLE, "Service Unavailable",
            f"more than {self.limits.max_per_address} connections from one address",
        )
        try:
            sock.setblocking(False)
            sock.send(b"HTTP/1.1 503 Service Unavailable\r\n"
                      b"Connection: close\r\n"
                      + f"Content-Type: {ERROR_MEDIA_TYPE}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
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


class Server(GuardedServer):
    """The service's server: guarded, with the service's channel."""

    channel_class = Channel


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
