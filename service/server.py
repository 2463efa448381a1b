"""Running the app on waitress, with the settings a thousand holds need."""

from __future__ import annotations

import json
import logging
import resource
import signal

import waitress
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

logger = logging.getLogger(__name__)


def raise_open_file_limit(wanted):
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class JSONErrorTask(ErrorTask):
    """waitress's own refusals (413, 400, 431) as the API's JSON errors."""

    def execute(self):
        error = self.request.error
        body = json.dumps({"title": error.reason, "description": error.body}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class Channel(HTTPChannel):
    error_task_class = JSONErrorTask


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
        "channel_request_lookahead": 4,
        # waitress reads a whole body before it calls the app: refuse an
        # oversized one on its Content-Length, before reading it.
        "max_request_body_size": settings.max_body_bytes + 1,
        "ident": "livecomments",
        "clear_untrusted_proxy_headers": True,
        "expose_tracebacks": False,
    }


def create_server(app, settings):
    """Create (bind) the waitress server; ``run()`` it to serve."""
    limit = raise_open_file_limit(settings.connection_limit + settings.threads + 256)
    if limit < settings.connection_limit + 64:
        logger.warning(
            "open-file limit %d is below connection_limit %d: raise `ulimit -n`",
            limit, settings.connection_limit,
        )
    server = waitress.create_server(app, **waitress_options(settings))
    server.channel_class = Channel
    return server


def serve(app, settings):
    """Serve until SIGINT or SIGTERM, then close the app's threads and pool."""
    server = create_server(app, settings)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    logger.info(
        "livecomments serving on http://%s:%s (%d threads, hold budget %d, %s)",
        settings.host, server.effective_port, settings.threads, settings.hold_budget,
        app.store.dialect,
    )
    try:
        server.run()
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        server.close()
        app.close()
