"""The application factory: builds the collaborators and wires the routes."""

from __future__ import annotations

import logging

import falcon

from .common.errors import (
    ERROR_MEDIA_TYPE,
    ErrorCode,
    StoreUnavailable,
    code_for_status,
    error_document,
)
from .config.settings import Settings
from .db.limits import PostLimit
from .db.listener import Listener, pg_connector
from .db.store import Store
from .live.hub import Draining, FeedHub
from .web import assets, formats
from .web.auth import TokenSigner
from .web.devtokens import DevTokensResource
from .web.metrics import Metrics, MetricsResource, WriteMetrics, multiprocess_dir
from .web.moderation import BanResource, BansResource, RoomResource
from .web.openapi import OpenAPIResource
from .web.resources import (
    CallbackGuard,
    CommentResource,
    CommentsResource,
    HealthResource,
    QueryCommentsResource,
)
from .web.sse import StreamResource
from .web.sse_many import FeedsStreamResource

logger = logging.getLogger(__name__)

#: Seconds a client is asked to wait before retrying while the database
#: is down or the server drains: long enough not to hammer a restarting
#: database, short enough to resume well within a hold.
RETRY_AFTER = 2


class App(falcon.App):
    """The WSGI app, owning the store, the feed hub and the NOTIFY listener."""

    def __init__(self, settings, store, hub, metrics, listener=None, **kwargs):
        super().__init__(**kwargs)
        self.settings = settings
        self.store = store
        self.hub = hub
        self.metrics = metrics
        #: The :class:`~service.listener.Listener`, or None (SQLite, notify off).
        self.listener = listener

    def close(self):
        """Stop serving feeds (held viewers are answered at once, new reads
        get 503), join the background threads, release the connections.

        Safe to call more than once: connections opened since the last
        call are released again.
        """
        if self.listener is not None:
            self.listener.stop()
            if not self.listener.join(self.settings.shutdown_timeout):
                logger.warning("the NOTIFY listener did not stop")
        self.hub.close(timeout=self.settings.shutdown_timeout)
        self.metrics.close(timeout=self.settings.shutdown_timeout)
        self.store.dispose()

    @property
    def database(self):
        """The database's dialect name, for logs."""
        return self.store.dialect


def create_app(settings=None, *, store=None, signer=None, clock=None):
    """Build the app. Tests pass their own store, signer and clocks."""
    settings = settings or Settings.from_env()
    if store is None:
        store = Store.from_settings(settings)
        if settings.is_sqlite:
            # Embedded: created, or upgraded, here, as `init-db` would.
            store.create_schema()
        # PostgreSQL is upgraded by `livecomments init-db` only: refused
        # (SchemaError, saying so) at any other version than the code's.
        store.check_schema()
    if signer is None:
        signer = TokenSigner(settings.resolve_secret())
    limit = None if settings.post_rate is None else PostLimit(*settings.post_rate)

    hub = FeedHub(store, settings, **({} if clock is None else {"clock": clock}))
    metrics = Metrics(hub, multiproc_dir=multiprocess_dir())
    middleware = [CallbackGuard(settings), WriteMetrics(metrics)]
    if settings.cors_origins:
        origins = "*" if "*" in settings.cors_origins else settings.cors_origins
        middleware.append(
            falcon.CORSMiddleware(
                allow_origins=origins,
                expose_headers=["Location", "Retry-After", "Idempotent-Replayed"],
            )
        )
    listener = None
    if settings.notify and store.dialect == "postgresql":
        listener = Listener(
            pg_connector(store.engine, connect_timeout=settings.db_connect_timeout),
            settings.notify_channel, on_notify=hub.notified, on_state=hub.listening,
            backoff_max=settings.poll_backoff_max,
        )
        hub.listening(False)  # polling as usual until LISTEN is in effect
    app = App(settings, store, hub, metrics, listener, middleware=middleware)
    app.set_error_serializer(serialize_error)
    # The store turns every database error (SQLAlchemy's, and a driver's
    # own that escaped it) into this one: see service/db/engines.py.
    app.add_error_handler(StoreUnavailable, handle_database_error)
    app.add_error_handler(Draining, handle_draining)

    app.add_route(
        "/contents/{content_id}/comments",
        CommentsResource(hub, settings, store=store, signer=signer, limit=limit),
    )
    app.add_route("/comments", QueryCommentsResource(hub, settings))
    app.add_route(
        "/contents/{content_id}/comments/{comment_id}",
        CommentResource(hub, store=store, signer=signer),
    )
    moderation = {"store": store, "signer": signer}
    app.add_route("/contents/{content_id}/bans", BansResource(hub, settings, **moderation))
    app.add_route("/contents/{content_id}/bans/{author_id}",
                  BanResource(hub, settings, **moderation))
    app.add_route("/contents/{content_id}/room", RoomResource(hub, settings, **moderation))
    app.add_route("/healthz", HealthResource(store, hub))
    app.add_route("/metrics", MetricsResource(metrics))
    app.add_route("/openapi.json", OpenAPIResource())
    app.add_route("/contents/{content_id}/comments/stream", StreamResource(hub, settings))
    app.add_route("/comments/stream", FeedsStreamResource(hub, settings))
    if settings.dev:  # development mode only: elsewhere the path is a 404
        app.add_route("/dev/tokens", DevTokensResource(signer))
    files, demo_page = assets.load()
    app.add_route("/static/{name}", assets.StaticResource(files))
    demo = assets.DemoResource(demo_page)
    app.add_route("/", demo)
    app.add_route("/demo/{content_id}", demo)
    hub.start()
    metrics.start()
    if listener is not None:
        listener.start()
    return app


def serialize_error(req, resp, exception):
    """Every error is a document with a code from the fixed list
    (:class:`~service.common.errors.ErrorCode`: the raiser's, else the
    status's), a title and a description, never a traceback: JSON, or one
    line for a feed read answered in lines."""
    if exception.code is None:
        code = code_for_status(exception.status_code)
    else:
        code = ErrorCode(exception.code)  # a code not in the list is a bug: a 500
    if getattr(req.context, "answer_format", None) == formats.LINES:
        resp.data = formats.encode_error_line(code, exception.description or exception.title)
        resp.content_type = formats.LINES_MEDIA_TYPE
    else:
        # Fields of a code's own (a ban's "until"), set by the raiser.
        extra = getattr(exception, "extra", None) or {}
        resp.data = error_document(code, exception.title, exception.description, **extra)
        resp.content_type = ERROR_MEDIA_TYPE
    resp.cache_control = ["no-store"]


def handle_database_error(req, resp, exc, params):
    logger.error("database error on %s %s: %s", req.method, req.path, exc)
    raise falcon.HTTPServiceUnavailable(
        title="Database unavailable",
        description="the database did not answer; try again shortly",
        retry_after=RETRY_AFTER,
        code=ErrorCode.UNAVAILABLE,
    )


def handle_draining(req, resp, exc, params):
    raise falcon.HTTPServiceUnavailable(
        title="Shutting down",
        description="this server is stopping; retry with the same cursor",
        retry_after=RETRY_AFTER,
        code=ErrorCode.UNAVAILABLE,
    )
