"""``GET /metrics``: the process's figures in the Prometheus exposition format.

The wake path stays lock-free (``docs/design.md``): a woken thread only
appends ``(time, page)`` to the hub's ``woken`` deque, and the metrics
thread drains it into the delivery-latency histogram once a second. What
the hub counts already (answers by kind, held slots, feeds) is copied into
Prometheus objects by the same thread, and again just before a scrape, so
no hot path touches a Prometheus lock. Pollers observe their own queries
(one thread per content, never a viewer's thread), and writes are counted
by a middleware that looks at POST and DELETE only.

Each app has a registry of its own (tests build many apps). Under
``serve --workers K`` the command exports the ``metrics_dir`` setting (or
a temporary directory) as ``PROMETHEUS_MULTIPROC_DIR`` before the workers
start: each worker then writes its figures to files there, gauges are set
by the metrics thread rather than read when scraped, and a scrape of any
worker aggregates every worker's files.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import threading
import time

import falcon
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ..common.retry import run_pass
from ..live.pages import Kind

logger = logging.getLogger(__name__)

#: Seconds between the metrics thread's passes: how stale a scraped
#: figure of another worker may be, and how late a latency sample lands.
METRICS_INTERVAL = 1.0
#: Delivery latency buckets, in seconds: a fan-out to a thousand viewers
#: takes a tenth to half a second; a poll interval is 0.5 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
#: Database round trips: a poll is a millisecond or two, a stuck one ends
#: at the statement timeout (10 s).
QUERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
#: The methods :class:`WriteMetrics` counts; feed reads are never touched.
WRITE_METHODS = frozenset({"POST", "DELETE"})


#: prometheus-client's own variable, not a setting of ours: the library
#: reads it in each process as it creates a metric's value, so it is how
#: the forked workers learn the directory (the ``metrics_dir`` setting)
#: that :func:`prepare_multiprocess_dir` exports before the first fork.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir():
    """The directory this process's prometheus-client writes its values to
    (:data:`MULTIPROC_ENV`, exported for ``--workers``), or None."""
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir(path=None):
    """For a supervisor about to fork workers: export ``path`` (the
    ``metrics_dir`` setting), emptied of an earlier run's files, or else a
    new temporary directory, as :data:`MULTIPROC_ENV`. Returns the
    temporary directory, for :func:`remove_multiprocess_dir` at the end
    (None for ``path``, which is kept)."""
    if path is not None:
        for name in glob.glob(os.path.join(path, "*.db")):
            os.remove(name)
        created = None
    else:
        path = created = tempfile.mkdtemp(prefix="livecomments-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return created


def process_dead(pid):
    """A worker ended: its gauges stop counting (its counters still do)."""
    path = multiprocess_dir()
    if path is not None:
        mark_process_dead(pid, path)


def remove_multiprocess_dir(path):
    """Once the workers have stopped: export no directory any more, and
    remove ``path`` (the temporary one :func:`prepare_multiprocess_dir` made)."""
    os.environ.pop(MULTIPROC_ENV, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


class Metrics:
    """The app's Prometheus metrics, read from the hub and fed by its hooks.

    :meth:`start` runs the metrics thread; :meth:`close` stops it.
    """

    def __init__(self, hub, *, multiproc_dir=None):
        self.hub = hub
        self.multiproc_dir = multiproc_dir
        if multiproc_dir and values.ValueClass is values.MutexValue:
            # prometheus-client picks where values live when first imported;
            # the supervisor may have imported it before it set the directory.
            values.ValueClass = values.MultiProcessValue()
        self.registry = CollectorRegistry()
        self._gauges = []  # (gauge, read) pairs the thread sets in multi-process mode
        self._synced = {}  # the hub's counts already added to their counters
        self._sync_lock = threading.Lock()  # the thread and a scrape; never a viewer
        self._stop = threading.Event()
        self._thread = None
        r = self.registry
        budget = hub.budget
        self._gauge("livecomments_held", "Hold slots in use: long-polls held and streams open.",
                    lambda: budget.held)
        self._gauge("livecomments_streams_open", "Event streams open.", lambda: budget.streams)
        self._gauge("livecomments_hold_budget", "Most long-polls held at once (hold budget).",
                    lambda: budget.limit)
        self._gauge("livecomments_max_streams", "Most event streams open at once.",
                    lambda: budget.stream_limit)
        self._gauge("livecomments_feeds", "Contents whose feed this process keeps.",
                    lambda: len(hub.pollers()))
        self._gauge("livecomments_pollers", "Poller threads, retiring ones included.",
                    hub.running_pollers)
        self._staleness = {}
        self._gauge("livecomments_poll_age_max_seconds",
                    "Seconds since the store last answered the most lagging poller.",
                    lambda: self._staleness.get("max_age", 0.0), mode="livemax")
        self._gauge("livecomments_stale_pollers",
                    "Pollers without a successful query for longer than stale_after.",
                    lambda: self._staleness.get("stale_count", 0))
        self.answers = Counter("livecomments_feed_answers", "Feed answers given, by kind "
                               "(shed: the hold budget was spent).", ["kind"], registry=r)
        for kind in Kind:
            self.answers.labels(kind.value)  # every kind shows, at 0 too
        self.streams_refused = Counter("livecomments_streams_refused",
                                       "Event streams refused (cap or budget reached).",
                                       registry=r)
        self.deliveries = Counter("livecomments_deliveries",
                                  "Changes handed to held viewers by the wake path "
                                  "(one per viewer and change).", registry=r)
        self.latency = Histogram("livecomments_delivery_latency_seconds",
                                 "From a change's commit (created_at) to its woken "
                                 "viewer's answer, per answer (its oldest change).",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queries = Histogram("livecomments_feed_query_seconds",
                                 "Duration of the pollers' feed queries.",
                                 buckets=QUERY_BUCKETS, registry=r)
        self.query_errors = Counter("livecomments_feed_query_errors",
                                    "Pollers' feed queries that failed.", registry=r)
        self.writes = Counter("livecomments_writes", "POST and DELETE answers, by status.",
                              ["method", "status"], registry=r)
        self.write_seconds = Histogram("livecomments_write_seconds",
                                       "POST and DELETE handling time.", ["method"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.rate_limited = Counter("livecomments_rate_limited",
                                    "Posts refused by the posting limit (429).", registry=r)
        self.notify_wakes = Counter("livecomments_notify_wakes",
                                    "NOTIFYs heard from writers (here or in other processes).",
                                    registry=r)
        hub.on_query = self.observe_query

    def _gauge(self, name, documentation, read, mode="livesum"):
        gauge = Gauge(name, documentation, registry=self.registry, multiprocess_mode=mode)
        if self.multiproc_dir:
            self._gauges.append((gauge, read))  # files hold values, not functions
        else:
            gauge.set_function(read)

    # -- the metrics thread --------------------------------------------------

    def start(self):
        if self._thread is None:
            self.sync()
            self._thread = threading.Thread(target=self._run, name="livecomments-metrics",
                                            daemon=True)
            self._thread.start()

    def close(self, timeout=5.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self):
        while not self._stop.wait(METRICS_INTERVAL):
            run_pass(self.sync, logger, "metrics")

    def sync(self):
        """Drain the delivery samples; copy the hub's counts and gauges."""
        with self._sync_lock:
            self._drain()
            for kind, total in self.hub.budget.answers().items():
                self._add(self.answers.labels(kind), ("answers", kind), total)
            self._add(self.streams_refused, "refused", self.hub.budget.refused_streams)
            self._add(self.notify_wakes, "notify", self.hub.notify_wakes)
            self._staleness = self.hub.staleness()
            for gauge, read in self._gauges:
                gauge.set(read())

    def _add(self, counter, key, total):
        delta = total - self._synced.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._synced[key] = total

    def _drain(self):
        woken = self.hub.woken
        delivered = 0
        while True:
            try:
                answered, page = woken.popleft()
            except IndexError:
                break
            delivered += len(page.changes)
            committed = page.changes[0].created_at.timestamp()
            self.latency.observe(max(0.0, answered - committed))
        if delivered:
            self.deliveries.inc(delivered)

    # -- hooks -------------------------------------------------------------

    def observe_query(self, seconds, failed):
        """A poller's query took ``seconds`` (on the poller's own thread)."""
        self.queries.observe(seconds)
        if failed:
            self.query_errors.inc()

    def observe_write(self, method, status, seconds):
        self.writes.labels(method, str(status)).inc()
        self.write_seconds.labels(method).observe(seconds)
        if status == 429:
            self.rate_limited.inc()

    def exposition(self, accept=None):
        """(body, content type) of a scrape: this registry, or every worker's files."""
        self.sync()
        registry = self.registry
        if self.multiproc_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiproc_dir)
        encode, content_type = choose_encoder(accept)
        return encode(registry), content_type


class WriteMetrics:
    """Middleware: POST and DELETE answers by status, and how long they took.

    A GET (a woken long-poll on its way out) only has its method compared.
    """

    def __init__(self, metrics):
        self._metrics = metrics

    def process_request(self, req, resp):
        if req.method in WRITE_METHODS:
            req.context.write_started = time.perf_counter()

    def process_response(self, req, resp, resource, req_succeeded):
        if req.method in WRITE_METHODS:
            started = getattr(req.context, "write_started", None)
            elapsed = 0.0 if started is None else time.perf_counter() - started
            self._metrics.observe_write(req.method, resp.status_code, elapsed)


class MetricsResource:
    """``/metrics``: never kept by a cache (no-store)."""

    def __init__(self, metrics):
        self._metrics = metrics

    def on_get(self, req, resp):
        resp.data, resp.content_type = self._metrics.exposition(req.get_header("Accept"))
        resp.cache_control = ["no-store"]
        resp.status = falcon.HTTP_200
