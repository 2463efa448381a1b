"""The application factory: builds the collaborators and wires the routes."""

from __future__ import annotations

import json
import logging

import falcon
import sqlalchemy as sa

from .auth import TokenSigner
from .hub import FeedHub
from .openapi import OpenAPIResource
from .ratelimit import RateLimiter
from .resources import CommentResource, CommentsResource, HealthResource, QueryCommentsResource
from .settings import Settings
from .store import Store

logger = logging.getLogger(__name__)


class App(falcon.App):
    """The WSGI app, owning the store and the feed pollers it uses."""

    def __init__(self, settings, store, hub, **kwargs):
        super().__init__(**kwargs)
        self.settings = settings
        self.store = store
        self.hub = hub

    def close(self):
        """Stop the pollers (answering held viewers) and release connections."""
        self.hub.close()
        self.store.dispose()


def create_app(settings=None, *, store=None, signer=None, clock=None, limiter_clock=None):
    """Build the app. Tests pass their own store, signer and clocks."""
    settings = settings or Settings.from_env()
    if store is None:
        store = Store.from_settings(settings)
        if settings.is_sqlite and not store.has_schema():
            store.create_schema()
    if signer is None:
        signer = TokenSigner(settings.resolve_secret())
    limiter = None
    if settings.post_rate is not None:
        count, window = settings.post_rate
        kwargs = {} if limiter_clock is None else {"clock": limiter_clock}
        limiter = RateLimiter(count, window, **kwargs)

    middleware = []
    if settings.cors_origins:
        origins = "*" if "*" in settings.cors_origins else settings.cors_origins
        middleware.append(
            falcon.CORSMiddleware(allow_origins=origins, expose_headers=["Location", "Retry-After"])
        )
    hub = FeedHub(store, settings, **({} if clock is None else {"clock": clock}))
    app = App(settings, store, hub, middleware=middleware)
    app.set_error_serializer(serialize_error)
    app.add_error_handler(sa.exc.SQLAlchemyError, handle_database_error)

    reader, on_change = hub, hub.notify
    app.add_route(
        "/contents/{content_id}/comments",
        CommentsResource(reader, settings, store=store, signer=signer, limiter=limiter,
                         on_change=on_change),
    )
    app.add_route("/comments", QueryCommentsResource(reader, settings))
    app.add_route(
        "/contents/{content_id}/comments/{comment_id}",
        CommentResource(store=store, signer=signer, on_change=on_change),
    )
    app.add_route("/healthz", HealthResource(store, status=hub.status))
    app.add_route("/openapi.json", OpenAPIResource())
    return app


def serialize_error(req, resp, exception):
    """Every error is JSON with a title and a description, never a traceback."""
    body = {"title": exception.title, "description": exception.description or exception.title}
    resp.data = json.dumps(body).encode()
    resp.content_type = falcon.MEDIA_JSON
    resp.cache_control = ["no-store"]


def handle_database_error(req, resp, exc, params):
    logger.error("database error on %s %s: %s", req.method, req.path, exc)
    raise falcon.HTTPServiceUnavailable(
        title="Database unavailable",
        description="the database did not answer; try again shortly",
        retry_after=2,
    )
