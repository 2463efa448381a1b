"""Fixtures: databases (SQLite, PostgreSQL) → store → app → clients and servers.

PostgreSQL tests use ``LIVECOMMENTS_TEST_DATABASE_URL`` and create and drop
a schema of their own, so runs never collide. Without a PostgreSQL server
they are skipped, with the reason shown; under ``CI=true`` that is a failure.
"""

from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa
import webtest
from webtest.http import StopableWSGIServer

from service.app import create_app
from service.config.settings import Settings
from service.db.store import Store, create_engine
from service.serve.channel import Channel
from service.serve.listen import GuardMixin
from service.serve.server import guard_limits, waitress_options
from service.web.auth import TokenSigner

PG_URL = os.environ.get(
    "LIVECOMMENTS_TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SECRET = "test-secret-0123456789abcdef"

_pg_state = {}


def _postgres_error():
    """None if PostgreSQL answers, else why not (checked once per run)."""
    if "error" not in _pg_state:
        engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            _pg_state["error"] = None
        except sa.exc.OperationalError as exc:
            _pg_state["error"] = str(exc).splitlines()[0]
        finally:
            engine.dispose()
    return _pg_state["error"]


def require_postgres():
    error = _postgres_error()
    if error is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true but PostgreSQL at {PG_URL} does not answer: {error}")
    pytest.skip(f"PostgreSQL at {PG_URL} does not answer: {error}")


def notify_channel_for(url):
    """The NOTIFY channel of a test database: its schema's name, so test
    runs sharing the PostgreSQL database (channels are database-wide) never
    hear each other. None for SQLite."""
    if not url.startswith("postgresql"):
        return None
    options = sa.engine.make_url(url).query.get("options", "")
    _, found, rest = options.partition("search_path=")
    return rest.split()[0] if found else "lc_test"


def with_search_path(url, schema):
    """``url`` with every connection's search_path set to ``schema``."""
    parsed = sa.engine.make_url(url)
    options = f"-csearch_path={schema}"
    return parsed.update_query_dict({"options": options}).render_as_string(hide_password=False)


def with_application_name(url, name):
    """``url`` whose connections carry ``application_name``, so that a test
    can find (and kill) exactly its own connections."""
    return sa.engine.make_url(url).update_query_dict({"application_name": name}).render_as_string(
        hide_password=False)


@pytest.fixture
def kill_connections():
    """``kill_connections(name, listening=False)``: terminate (as a restarted
    or failing PostgreSQL would) every connection whose application_name is
    ``name`` (an app's: :func:`with_application_name`), or with
    ``listening`` only its LISTEN connection; returns how many. One admin
    connection serves every call, so a test may kill again and again."""
    require_postgres()
    admin = sa.create_engine(PG_URL)

    def kill(name, *, listening=False):
        only = " AND query LIKE 'LISTEN %'" if listening else ""
        with admin.begin() as conn:
            return conn.execute(sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = :name AND pid <> pg_backend_pid()" + only
            ), {"name": name}).scalar_one()

    yield kill
    admin.dispose()


@pytest.fixture
def pg_url():
    """A PostgreSQL URL whose connections use a fresh, empty schema."""
    require_postgres()
    schema = f"lc_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(PG_URL, schema)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'livecomments.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request):
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def make_store():
    stores = []

    def make(url, **kwargs):
        kwargs.setdefault("notify_channel", notify_channel_for(url))
        store = Store(create_engine(url, pool_size=20), **kwargs)
        if not store.has_schema():
            store.create_schema()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.dispose()


@pytest.fixture
def store(make_store, database_url):
    return make_store(database_url)


def make_settings(database_url="sqlite://", **overrides):
    """Settings for tests: small thread counts, a known secret; every test
    client connects from 127.0.0.1, exempt from the per-address limit
    unless a test says otherwise."""
    values = {
        "database_url": database_url,
        "secret": SECRET,
        "threads": 40,
        "hold_budget": 30,
        "connection_limit": 500,
        "post_rate": "0",
        "port": 8080,
        "trusted_proxies": "127.0.0.1",
    }
    if notify_channel_for(database_url):
        values["notify_channel"] = notify_channel_for(database_url)
    values.update(overrides)
    return Settings.from_env(environ={}, **values)


@pytest.fixture
def signer():
    return TokenSigner(SECRET)


@pytest.fixture
def token(signer):
    """``token(author_id, role="user")``: an ``Authorization`` header value."""

    def make(author_id=1, role="user", ttl=3600):
        return f"Bearer {signer.mint(author_id, role, ttl)}"

    return make


@pytest.fixture
def make_app(database_url, make_store):
    """``make_app(**settings)``: an app over this test's database;
    ``store_options`` go to its store (a clock, say)."""
    apps = []

    def make(*, store_options=None, **overrides):
        settings = make_settings(database_url, **overrides)
        app = create_app(settings, store=make_store(database_url, **(store_options or {})))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def make_app_at(make_store):
    """``make_app_at(url, **settings)``: an app of the test's own over ``url``
    (another process over the same database, or SQLite where the database
    does not matter)."""
    apps = []

    def make(url, **overrides):
        app = create_app(make_settings(url, **overrides), store=make_store(url))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return webtest.TestApp(app)


class Server(GuardMixin, StopableWSGIServer):
    channel_class = Channel

    def run(self):
        # StopableWSGIServer's loop uses select(), which fails past 1,024
        # descriptors; serve() uses poll().
        try:
            self.asyncore.loop(0.5, map=self._map, use_poll=True)
        except OSError:  # pragma: no cover
            if not self.was_shutdown:
                raise


@pytest.fixture
def make_server():
    """``make_server(app)``: the app on a real waitress server on a free port."""
    servers = []

    def make(app):
        options = waitress_options(app.settings)
        for name in ("host", "port", "ident"):
            options.pop(name)
        server = Server.create(app, limits=guard_limits(app.settings), **options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()


@pytest.fixture
def server(make_server, app):
    return make_server(app)
