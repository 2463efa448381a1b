"""Running the app on waitress, with the settings a thousand holds need:
waitress's options and the connection limits from the settings, the
open-file limit, and a shutdown that answers held viewers first."""

from __future__ import annotations

import _thread
import logging
import resource
import signal
import threading
import time

from . import listen

logger = logging.getLogger(__name__)

#: Open files wanted beyond connections and threads: the listening socket,
#: database connections, logs, the interpreter's own.
FILE_HEADROOM = 256
#: Requests waitress reads ahead on a connection whose request is still
#: running. Above 0 so that it keeps reading a held request's socket and
#: sees the client leave; small, so a pipelining client cannot queue much.
REQUEST_LOOKAHEAD = 4


def raise_open_file_limit(wanted):
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def waitress_options(settings):
    """waitress adjustments for this service, from the settings."""
    return {
        "host": settings.host,
        "port": settings.port,
        "threads": settings.threads,
        "connection_limit": settings.connection_limit,
        "backlog": settings.backlog,
        "channel_timeout": settings.channel_timeout,
        # select() fails past 1,024 descriptors; poll() has no such limit.
        "asyncore_use_poll": True,
        # Keep reading while a request is held, so a vanished client is
        # seen (environ["waitress.client_disconnected"]) and its slot freed.
        "channel_request_lookahead": REQUEST_LOOKAHEAD,
        # waitress reads a whole body before it calls the app: refuse an
        # oversized one on its Content-Length, before reading it.
        "max_request_body_size": settings.max_body_bytes + 1,
        "max_request_header_size": settings.max_header_bytes,
        # Seconds between passes that close connections out of time
        # (guard_limits): header_timeout is enforced to about a second.
        "cleanup_interval": 1,
        "ident": "livecomments",
        "clear_untrusted_proxy_headers": True,
        "expose_tracebacks": False,
    }


def guard_limits(settings):
    """The connection limits :mod:`.listen` enforces, from the settings."""
    return listen.Limits(
        header_timeout=settings.header_timeout,
        idle_timeout=settings.channel_timeout,
        max_per_address=settings.max_connections_per_address,
        trusted=settings.trusted_proxies,
    )


def create_server(app, settings, sockets=None):
    """Create (bind) the waitress server; ``run()`` it to serve.

    ``sockets``: bound sockets to listen on instead of host and port (a
    worker's SO_REUSEPORT socket, see :mod:`.workers`).
    """
    limit = raise_open_file_limit(settings.connection_limit + settings.threads + FILE_HEADROOM)
    if limit < settings.connection_limit + 64:
        logger.warning(
            "open-file limit %d is below connection_limit %d: raise `ulimit -n`",
            limit, settings.connection_limit,
        )
    options = waitress_options(settings)
    if sockets is not None:
        del options["host"], options["port"]
        options["sockets"] = sockets
    return listen.create_server(listen.Server, app, guard_limits(settings), **options)


def serve(app, settings, sockets=None):
    """Serve until SIGINT or SIGTERM; then answer held viewers and stop.

    Held long-polls are answered first (their clients come back with their
    cursor to another process or after the restart), given
    ``settings.shutdown_drain`` seconds to be written, and only then is
    waitress stopped.
    """
    server = create_server(app, settings, sockets)
    drained = threading.Event()
    shutdown = threading.Thread(
        target=_drain_then_stop, args=(app, settings.shutdown_drain, drained),
        name="livecomments-shutdown",
    )

    def stop(signum, frame):
        if drained.is_set():
            raise KeyboardInterrupt  # waitress's run() stops on it
        if shutdown.ident is None:
            logger.info("shutting down: answering held viewers")
            shutdown.start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info(
        "livecomments serving on http://%s:%s (%d threads, hold budget %d, %s)",
        settings.host, server.effective_port, settings.threads, settings.hold_budget,
        app.database,
    )
    try:
        server.run()  # returns once interrupted, after waitress's own shutdown
    finally:
        if shutdown.ident is not None:
            shutdown.join()
        app.close()
    logger.info("stopped")


def _drain_then_stop(app, drain_seconds, drained):
    app.close()
    time.sleep(drain_seconds)
    drained.set()
    _thread.interrupt_main()  # the main thread's handler now stops waitress
