"""Every setting of the service, with its default, in one place.

Settings come from ``LIVECOMMENTS_*`` environment variables and the matching
``serve`` flags (flags win), read by :mod:`.environment`. A bad value is
refused when the settings are built, with a message naming the setting, so
the server never starts half configured.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

from . import environment
from .parsers import parse_bool, parse_networks, parse_origins, parse_rate
from .secret import dev_secret

#: Of every eleven waitress threads, ten may hold long-polls by default;
#: the eleventh is kept for writes, health checks and catch-up reads (100
#: of the default 1,100), so those never queue behind held viewers.
HOLD_SHARE = (10, 11)

#: Streams may take one hold slot in this many by default: a stream keeps
#: its slot for minutes, a long-poll for seconds, so streams must leave
#: most of the budget to long-polls (250 of the default 1,000).
STREAM_SHARE = 4


class SettingsError(ValueError):
    """A setting has a value the service cannot run with."""


def _setting(default, env, help, parse=None, *, derived=None, metavar=None):
    """Declare a setting: its default, variable, help and parser in one place.

    ``derived`` describes how a default of None is worked out from other
    settings (see :meth:`Settings.__post_init__`); ``metavar`` names the
    flag's value in ``--help``.
    """
    return field(
        default=default,
        metadata={"env": env, "help": help, "parse": parse, "derived": derived,
                  "metavar": metavar},
    )


@dataclass(frozen=True)
class Settings:
    """The service's configuration. Build it with :meth:`from_env`."""

    # -- storage ---------------------------------------------------------
    #: SQLAlchemy URL. The embedded default is a SQLite file in the
    #: working directory; production uses ``postgresql+psycopg2://…``.
    database_url: str = _setting(
        "sqlite:///livecomments.db", "LIVECOMMENTS_DATABASE_URL",
        "SQLAlchemy URL; postgresql+psycopg2://user@host:5432/db in production"
    )
    #: Database connections kept open per process (the pool's size), for
    #: reads and posts; on PostgreSQL a quarter as many again for
    #: transactions. Above the writers at once: a connection beyond the
    #: pool is opened and closed per use (measured: a fifth of the POSTs/s).
    db_pool_size: int = _setting(
        20, "LIVECOMMENTS_DB_POOL_SIZE", "database connections kept per process"
    )
    #: Extra connections a burst of writes may open beyond the pool.
    db_max_overflow: int = _setting(
        50, "LIVECOMMENTS_DB_MAX_OVERFLOW", "extra database connections in a burst"
    )
    #: Seconds to wait for a PostgreSQL connection before giving up.
    db_connect_timeout: int = _setting(
        5, "LIVECOMMENTS_DB_CONNECT_TIMEOUT", "seconds to connect to PostgreSQL"
    )
    #: Longest a PostgreSQL statement may run, in seconds: a stuck query
    #: must not keep a poller (and its viewers) waiting for ever.
    db_statement_timeout: float = _setting(
        10.0, "LIVECOMMENTS_DB_STATEMENT_TIMEOUT", "longest PostgreSQL statement in seconds"
    )

    # -- network ---------------------------------------------------------
    host: str = _setting("127.0.0.1", "LIVECOMMENTS_HOST", "interface to listen on")
    port: int = _setting(8080, "LIVECOMMENTS_PORT", "TCP port to listen on")
    #: waitress worker threads. Every held long-poll occupies one thread,
    #: so this is sized to hold ``hold_budget`` viewers plus room for
    #: writes and catch-up reads. Each idle thread costs about 25 KB RSS.
    threads: int = _setting(1100, "LIVECOMMENTS_THREADS", "waitress worker threads")
    #: Open connections waitress accepts before it stops accepting.
    #: Above ``threads``: clients told to back off keep their keep-alive
    #: connection open while they wait.
    connection_limit: int = _setting(
        4000, "LIVECOMMENTS_CONNECTION_LIMIT", "most open client connections"
    )
    #: listen(2) backlog: a thousand viewers reconnecting at once must not
    #: see refused connections.
    backlog: int = _setting(2048, "LIVECOMMENTS_BACKLOG", "listen backlog")
    #: Server processes sharing the port (SO_REUSEPORT), each with its own
    #: threads, hold budget, connection limit and database pool; a
    #: supervisor restarts those that die. 1 serves in this process.
    workers: int = _setting(
        1, "LIVECOMMENTS_WORKERS", "server processes sharing the port; budgets are per worker"
    )
    #: Directory the workers write their metrics to, so that a scrape of
    #: any worker answers for all (prometheus-client's multiprocess mode);
    #: emptied of an earlier run's files at start. None: a temporary
    #: directory, removed at the end. Used with ``workers`` above 1 only.
    metrics_dir: str | None = _setting(
        None, "LIVECOMMENTS_METRICS_DIR",
        "directory of the workers' metrics files, emptied at start (workers above 1); "
        "none: a temporary one", metavar="DIR",
    )
    #: Seconds a keep-alive connection with no request in progress is
    #: kept, counted from its last response (bytes trickling in do not
    #: refresh it); also how long output a client does not read may wait.
    #: Must exceed ``max_wait``: a held request is never cut, but a client
    #: pausing for ``poll_after_ms`` keeps its connection idle meanwhile.
    channel_timeout: int | None = _setting(
        None, "LIVECOMMENTS_CHANNEL_TIMEOUT", "seconds an idle connection is kept",
        derived="the larger of 120 and max_wait + 30",
    )
    #: Seconds a stopping server gives held answers to be written before
    #: waitress closes the connections.
    shutdown_drain: float = _setting(
        0.5, "LIVECOMMENTS_SHUTDOWN_DRAIN", "seconds held answers get to leave at shutdown"
    )
    #: Seconds shutdown waits for each background thread before it gives
    #: up on it (and logs which).
    shutdown_timeout: float = _setting(
        5.0, "LIVECOMMENTS_SHUTDOWN_TIMEOUT", "seconds shutdown waits for background threads"
    )
    #: Seconds within which a request's headers must arrive once its first
    #: byte has (a new connection's first request: once it is opened), and
    #: then its body; else 408 and the connection is closed (slowloris).
    header_timeout: float = _setting(
        30.0, "LIVECOMMENTS_HEADER_TIMEOUT", "seconds to receive a request's headers"
    )
    #: Most connections one client address (an IPv6 /64) may hold; beyond
    #: it a connection is answered 503 and closed. None: a quarter of
    #: ``connection_limit``.
    max_connections_per_address: int | None = _setting(
        None, "LIVECOMMENTS_MAX_CONNECTIONS_PER_ADDRESS",
        "most connections from one client address (an IPv6 /64)",
        derived="a quarter of connection_limit (1,000 of 4,000)", metavar="COUNT",
    )
    #: Addresses or networks exempt from ``max_connections_per_address``:
    #: a proxy or cache in front (nginx, Varnish) carries every viewer's
    #: connection and must be listed. Forwarded headers stay untrusted.
    trusted_proxies: tuple[str, ...] = _setting(
        (), "LIVECOMMENTS_TRUSTED_PROXIES",
        "comma-separated proxy addresses or networks exempt from the per-address limit",
        parse_networks,
    )

    # -- security --------------------------------------------------------
    #: HMAC-SHA256 key for bearer tokens. Required unless ``dev`` is on.
    secret: str | None = _setting(
        None, "LIVECOMMENTS_SECRET", "HMAC-SHA256 token key (16+ characters); required unless dev"
    )
    #: Development mode: without a secret, generate one and keep it in
    #: ``.livecomments-dev-secret`` in the working directory (:mod:`.secret`).
    dev: bool = _setting(
        False, "LIVECOMMENTS_DEV", "development mode (generated secret)", parse_bool
    )
    #: Per-author posting limit as (posts, seconds); None turns it off. A
    #: token bucket shared by every process: N posts at once, then N per S
    #: seconds (see :mod:`service.limits`).
    post_rate: tuple[int, float] | None = _setting(
        (5, 10.0), "LIVECOMMENTS_POST_RATE",
        "posting limit per author as N/S (a burst of N, then N per S s), 0 for none",
        parse_rate,
    )
    #: Seconds a post's ``Idempotency-Key`` is remembered: a retry with the
    #: same key within this time gets the first answer, not a second comment.
    idempotency_ttl: int = _setting(
        86400, "LIVECOMMENTS_IDEMPOTENCY_TTL",
        "seconds a POST's Idempotency-Key answers retries",
    )
    #: Seconds in which the same body from the same author to the same
    #: content is refused as a duplicate (409 ``duplicate``); 0 turns the
    #: check off. A retry with the POST's Idempotency-Key is never one.
    duplicate_window: int = _setting(
        30, "LIVECOMMENTS_DUPLICATE_WINDOW",
        "seconds in which an author's same comment is a duplicate, 0 for off",
    )
    #: Origins allowed to call the API from a browser (CORS); ``*`` for any.
    cors_origins: tuple[str, ...] = _setting(
        (), "LIVECOMMENTS_CORS_ORIGINS", "comma-separated allowed browser origins",
        parse_origins,
    )

    # -- request limits --------------------------------------------------
    #: Largest request line and headers together, in bytes (431 beyond);
    #: bounds what a connection still sending its headers holds in memory.
    max_header_bytes: int = _setting(
        32 * 1024, "LIVECOMMENTS_MAX_HEADER_BYTES", "largest request head in bytes"
    )
    #: Largest request body in bytes, refused on Content-Length (413).
    max_body_bytes: int = _setting(
        64 * 1024, "LIVECOMMENTS_MAX_BODY_BYTES", "largest request body in bytes"
    )
    #: Longest comment, in characters (400 beyond it).
    max_comment_chars: int = _setting(
        2000, "LIVECOMMENTS_MAX_COMMENT_CHARS", "longest comment in characters"
    )

    # -- the hold --------------------------------------------------------
    #: Seconds between a feed poller's queries for changes made elsewhere.
    poll_interval: float = _setting(
        0.5, "LIVECOMMENTS_POLL_INTERVAL", "seconds between a feed poller's queries"
    )
    #: Longest pause, in seconds, of a poller backing off a failing
    #: database (the pause doubles from 0.1 s up to this).
    poll_backoff_max: float = _setting(
        5.0, "LIVECOMMENTS_POLL_BACKOFF_MAX", "longest pause of a poller after database errors"
    )
    #: Wake other processes' viewers at once: writers NOTIFY, and each
    #: process keeps one LISTEN connection. PostgreSQL only.
    notify: bool | None = _setting(
        None, "LIVECOMMENTS_NOTIFY", "wake other processes at once with LISTEN/NOTIFY",
        parse_bool, derived="on for PostgreSQL, off for SQLite",
    )
    #: PostgreSQL channel of those wake-ups; channels are database-wide,
    #: so deployments sharing a database each need one of their own.
    notify_channel: str = _setting(
        "livecomments", "LIVECOMMENTS_NOTIFY_CHANNEL", "PostgreSQL NOTIFY channel of the wake-ups"
    )
    #: Seconds between a poller's queries while its process hears NOTIFY
    #: (notifications wake it sooner; this catches any one lost).
    notify_poll_interval: float = _setting(
        5.0, "LIVECOMMENTS_NOTIFY_POLL_INTERVAL", "seconds between a poller's queries while "
        "LISTEN is connected"
    )
    #: Seconds since a poller's last successful query after which
    #: ``/healthz`` answers 503: a process whose database connection is
    #: stuck is taken out by the load balancer. Above the backoff, so that
    #: a short outage the pollers ride out does not flap the health check.
    stale_after: float | None = _setting(
        None, "LIVECOMMENTS_STALE_AFTER",
        "seconds without a successful poll before /healthz answers 503",
        derived="the larger of 10, 2 × poll_backoff_max, 4 × poll_interval, 2 × notify_poll_interval",
    )
    #: Longest hold a client may ask for, in seconds.
    max_wait: int = _setting(30, "LIVECOMMENTS_MAX_WAIT", "longest hold in seconds")
    #: Hold when the client does not ask for a wait, in seconds; below the
    #: 30 s idle timeout common in proxies and mobile carriers.
    default_wait: int | None = _setting(
        None, "LIVECOMMENTS_DEFAULT_WAIT", "hold in seconds when the client names none",
        derived="20, or max_wait if that is lower",
    )
    #: Long-polls held at once per process. Below ``threads`` so that
    #: writes, health checks and catch-up reads always find a thread;
    #: long-polls beyond it are answered at once with ``poll_after_ms``.
    hold_budget: int | None = _setting(
        None, "LIVECOMMENTS_HOLD_BUDGET", "long-polls held at once per process",
        derived="threads × 10 ÷ 11 (1,000 of 1,100)",
    )
    #: What a client told to back off is asked to wait, in milliseconds.
    shed_poll_after_ms: int = _setting(
        2000, "LIVECOMMENTS_SHED_POLL_AFTER_MS", "pause asked of clients beyond the hold budget"
    )
    #: The pause, in milliseconds, every answer with changes of a busy
    #: feed (``BUSY_WAKES`` in ``BUSY_WINDOW``, see ``service/live/feed.py``)
    #: asks: its viewers come back once per pause for everything since, a
    #: batch per answer instead of an answer per comment. 0: never paced.
    busy_pace_ms: int = _setting(
        500, "LIVECOMMENTS_BUSY_PACE_MS", "pause asked of viewers of a busy feed, in ms; 0: never"
    )
    #: What every page of a closed content asks its clients to wait, in
    #: milliseconds: nothing is posted there until a moderator reopens it
    #: (which wakes the viewers still held, and streams end on closing).
    closed_poll_after_ms: int = _setting(
        300000, "LIVECOMMENTS_CLOSED_POLL_AFTER_MS", "pause asked of clients of a closed content"
    )
    #: Longest a write waits, in seconds, for its own process's feed to
    #: have it, so that the writer's next read shows it (read-your-writes).
    write_visible_timeout: float = _setting(
        1.0, "LIVECOMMENTS_WRITE_VISIBLE_TIMEOUT", "seconds a write waits to be readable"
    )
    #: Changes kept in memory per watched content.
    feed_window: int = _setting(
        1000, "LIVECOMMENTS_FEED_WINDOW", "changes kept in memory per content"
    )
    #: A client further behind than this gets ``reset`` and the latest page.
    reset_after: int = _setting(
        1000, "LIVECOMMENTS_RESET_AFTER", "changes behind at which a client is reset"
    )
    #: Seconds a feed nobody asks for is kept (with its poller). Above
    #: ``max_wait``: a feed must outlive the holds on it.
    feed_ttl: float | None = _setting(
        None, "LIVECOMMENTS_FEED_TTL", "seconds an unwatched feed is kept",
        derived="the larger of 60 and 2 × max_wait",
    )
    #: Most contents watched at once per process (a poller each).
    max_watched: int = _setting(
        10000, "LIVECOMMENTS_MAX_WATCHED", "most contents watched at once per process"
    )
    #: Seconds an HTTP cache in front may share a feed answer among the
    #: viewers of its URL (``s-maxage``); 0 keeps every answer ``no-store``.
    #: An empty answer then asks its clients to pause as long (see
    #: ``service/caching.py``). 1 or 2 behind Varnish or nginx.
    shared_cache_seconds: int = _setting(
        0, "LIVECOMMENTS_SHARED_CACHE_SECONDS",
        "seconds a cache in front may share a feed answer (s-maxage); 0: never"
    )

    # -- clients: streams and formats --------------------------------------
    #: Server-sent event streams open at once per process. Each keeps a
    #: thread and a hold slot for its whole life, so streams get a share
    #: of the hold budget of their own and long-polls are never starved;
    #: 0 turns streaming off (clients long-poll).
    max_streams: int | None = _setting(
        None, "LIVECOMMENTS_MAX_STREAMS", "event streams open at once per process",
        derived="a quarter of hold_budget (250 of 1,000)",
    )
    #: Seconds between keep-alives on a quiet stream: proxies see traffic,
    #: clients see the stream is alive, and a vanished client is noticed.
    sse_keepalive: float = _setting(
        15.0, "LIVECOMMENTS_SSE_KEEPALIVE", "seconds between keep-alives on a quiet stream"
    )
    #: Seconds after which a stream ends cleanly; the browser reconnects
    #: with Last-Event-ID. Bounds how long one client keeps a thread.
    sse_max_duration: float = _setting(
        300.0, "LIVECOMMENTS_SSE_MAX_DURATION", "seconds after which a stream ends (clients resume)"
    )
    #: Most feeds one request names (``?feeds=``): a page following a live
    #: event's side rooms or a dashboard of streams names a handful; each
    #: costs the read a feed lookup and its page.
    max_feeds: int = _setting(
        50, "LIVECOMMENTS_MAX_FEEDS", "most contents one request may follow (?feeds=)"
    )
    #: Feed pages at least this large are sent gzipped to clients that
    #: accept it (0: never).
    gzip_min_bytes: int = _setting(
        1024, "LIVECOMMENTS_GZIP_MIN_BYTES", "smallest feed page sent gzipped, 0 for never"
    )
    #: Answer ``callback=`` on the long-poll GET as JSONP, for browsers
    #: without CORS. Off by default: JSONP runs the answer as script.
    jsonp: bool = _setting(
        False, "LIVECOMMENTS_JSONP", "answer callback= on the long-poll GET as JSONP", parse_bool
    )

    def __post_init__(self):
        self._derive_defaults()
        positive = ["port", "threads", "connection_limit", "backlog", "channel_timeout",
                    "max_body_bytes", "max_comment_chars", "max_wait", "hold_budget",
                    "feed_window", "reset_after", "max_watched", "max_feeds", "db_pool_size",
                    "db_connect_timeout", "shed_poll_after_ms", "max_header_bytes",
                    "max_connections_per_address", "idempotency_ttl", "workers"]
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.closed_poll_after_ms < 1:
            raise SettingsError(
                f"closed_poll_after_ms must be at least 1, got {self.closed_poll_after_ms}"
            )
        if not 0 <= self.duplicate_window <= 3600:
            raise SettingsError(
                f"duplicate_window must be between 0 and 3600, got {self.duplicate_window}"
            )
        if self.shared_cache_seconds < 0:
            raise SettingsError(
                f"shared_cache_seconds must be 0 or more, got {self.shared_cache_seconds}"
            )
        if self.db_max_overflow < 0:
            raise SettingsError(f"db_max_overflow must be 0 or more, got {self.db_max_overflow}")
        if self.port > 65535:
            raise SettingsError(f"port must be at most 65535, got {self.port}")
        for name in ("poll_interval", "feed_ttl", "poll_backoff_max", "db_statement_timeout",
                     "stale_after",
                     "write_visible_timeout", "shutdown_timeout", "sse_keepalive",
                     "sse_max_duration", "header_timeout",
                     "notify_poll_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SettingsError(f"{name} must be a number above 0, got {value}")
        if not (math.isfinite(self.shutdown_drain) and self.shutdown_drain >= 0):
            raise SettingsError(f"shutdown_drain must be 0 or more, got {self.shutdown_drain}")
        if not 0 <= self.default_wait <= self.max_wait:
            raise SettingsError(
                f"default_wait must be between 0 and max_wait ({self.max_wait}), "
                f"got {self.default_wait}"
            )
        if self.hold_budget >= self.threads:
            raise SettingsError(
                f"hold_budget ({self.hold_budget}) must be below threads ({self.threads}): "
                "writes need free threads while long-polls are held"
            )
        if not 0 <= self.max_streams <= self.hold_budget:
            raise SettingsError(
                f"max_streams ({self.max_streams}) must be between 0 and hold_budget "
                f"({self.hold_budget}): each stream keeps a hold slot"
            )
        if self.gzip_min_bytes < 0:
            raise SettingsError(f"gzip_min_bytes must be 0 or more, got {self.gzip_min_bytes}")
        if self.channel_timeout <= self.max_wait:
            raise SettingsError(
                f"channel_timeout ({self.channel_timeout}) must exceed max_wait ({self.max_wait})"
            )
        query_every = max(self.poll_interval, self.notify_poll_interval if self.notify else 0)
        if self.stale_after <= query_every:
            raise SettingsError(
                f"stale_after ({self.stale_after}) must exceed the pollers' interval "
                f"({query_every}): every poller would be stale between two queries"
            )
        if self.feed_ttl <= self.max_wait:
            raise SettingsError(
                f"feed_ttl ({self.feed_ttl}) must exceed max_wait ({self.max_wait})"
            )
        if not self.database_url.startswith(("sqlite", "postgresql")):
            raise SettingsError(
                f"database_url must be a sqlite:// or postgresql:// URL, got {self.database_url!r}"
            )
        if self.notify and self.is_sqlite:
            raise SettingsError("notify needs PostgreSQL: SQLite has no LISTEN/NOTIFY")
        if not _CHANNEL.fullmatch(self.notify_channel):
            raise SettingsError(
                "notify_channel must be letters, digits and _ (at most 63, not starting "
                f"with a digit), got {self.notify_channel!r}"
            )
        if self.workers > 1 and self.is_sqlite and _is_memory_sqlite(self.database_url):
            raise SettingsError("workers above 1 need a database file or PostgreSQL: "
                                "an in-memory SQLite database is one process's own")
        if self.workers > 1 and self.metrics_dir is not None and not os.path.isdir(self.metrics_dir):
            raise SettingsError(f"metrics_dir must be an existing directory, got {self.metrics_dir!r}")
        if self.secret is not None and len(self.secret) < 16:
            raise SettingsError("secret must be at least 16 characters")

    def _derive_defaults(self):
        """Work out the defaults that follow other settings (None = derived)."""
        if self.threads < 2:
            raise SettingsError(
                f"threads must be at least 2 (one to hold, one to write), got {self.threads}"
            )
        shares, of = HOLD_SHARE
        derived = {
            "hold_budget": self.threads * shares // of,
            "default_wait": min(20, self.max_wait),
            "channel_timeout": max(120, self.max_wait + 30),
            "feed_ttl": max(60.0, 2.0 * self.max_wait),
            "notify": not self.is_sqlite,
            "stale_after": max(10.0, 2.0 * self.poll_backoff_max, 4.0 * self.poll_interval,
                               2.0 * self.notify_poll_interval),
        }
        for name, value in derived.items():
            if getattr(self, name) is None:
                # Frozen: set once here, as the dataclass's own __init__ does.
                object.__setattr__(self, name, value)
        if self.max_connections_per_address is None:  # a share of the limit
            object.__setattr__(self, "max_connections_per_address",
                               max(1, self.connection_limit // 4))
        if self.max_streams is None:  # follows the hold budget, derived or not
            object.__setattr__(self, "max_streams", self.hold_budget // STREAM_SHARE)

    @classmethod
    def from_env(cls, environ=None, **overrides):
        """Build settings from ``LIVECOMMENTS_*`` variables (``environ``,
        ``os.environ`` by default), then overrides (see
        :func:`.environment.read`).

        Overrides that are None are ignored, so parsed CLI flags can be
        passed straight through.
        """
        try:
            values = environment.read(dataclasses.fields(cls), environ, overrides)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        try:
            return cls(**values)
        except TypeError as exc:
            raise SettingsError(str(exc)) from None

    def resolve_secret(self, workdir="."):
        """Return the signing secret, generating the development one if allowed."""
        if self.secret:
            return self.secret
        if not self.dev:
            raise SettingsError(
                "secret is not set: set LIVECOMMENTS_SECRET, or LIVECOMMENTS_DEV=1 "
                "for a generated development secret"
            )
        return dev_secret(workdir)

    @property
    def is_sqlite(self):
        return self.database_url.startswith("sqlite")


def _is_memory_sqlite(url):
    """True for a SQLite URL naming no file (an in-memory database)."""
    path = url.partition("://")[2].lstrip("/").partition("?")[0]
    return path in ("", ":memory:")


# A channel name LISTEN takes unquoted-safe: an identifier PostgreSQL
# will not truncate (63 bytes).
_CHANNEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
