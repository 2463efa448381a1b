"""``serve --workers K``: K server processes on one port, and their supervisor.

Each worker listens on a socket of its own bound to the same address with
``SO_REUSEPORT``: the kernel hashes each new connection to one of them, so
viewers spread evenly (one shared accept queue did not: whichever worker
was quickest took more than its hold budget and shed viewers while the
other had room). The supervisor keeps a bound, never-listening socket of
the same group, which holds the port (and picks it, for port 0) while
workers come and go.

The supervisor forks the workers while it has no thread and no database
connection; each worker builds its own app after the fork. A worker that
dies is started again, after a pause that grows while workers keep dying
young. On SIGTERM or SIGINT every worker is sent SIGTERM and drains as a
single-process server does (held viewers answered first); those still
running at the deadline are killed.

The supervisor knows nothing of the app: what a worker's end means to the
rest of the service is the caller's ``on_worker_exit(pid)`` (the CLI
marks the worker's metrics dead there, see :mod:`service.web.metrics`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: First pause, in seconds, before a dead worker is started again; it
#: doubles for each worker that dies young, up to ``RESTART_DELAY_MAX``.
RESTART_DELAY_MIN = 0.1
#: Longest pause before a restart: a worker that cannot start (a database
#: refusing connections, say) is retried this often, not in a tight loop.
RESTART_DELAY_MAX = 10.0
#: Seconds a worker must live for its death to count as a one-off crash
#: rather than a crash loop (the pause then starts again from the minimum).
STEADY_AFTER = 10.0
#: Seconds a stopping worker gets beyond its own budget (drain plus
#: shutdown timeout) before the supervisor kills it.
STOP_GRACE = 1.0

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class AddressInUse(OSError):
    """Another process (another instance, another program) serves the port."""


def claim_port(host, port):
    """Refuse a port another process serves, before joining its group.

    Binding with ``SO_REUSEPORT`` succeeds beside any socket of the same
    user that has it too, so a second ``serve --workers`` on a served port
    would silently take a share of its connections (serving, perhaps,
    another database). A plain bind succeeds only if nobody holds the
    port: it is tried, and let go, first. (Two instances started in the
    same instant could both pass; the check is for the forgotten instance
    and the upgrade started before the old one stopped.)
    """
    if port == 0:
        return  # the kernel picks a free one
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        # SO_REUSEADDR alone: a port left in TIME_WAIT by our last run is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(exc.errno, f"address in use: {host}:{port} is served "
                                   "by another process") from None
            raise


def reuseport_socket(host, port):
    """A TCP socket bound to ``(host, port)`` with SO_REUSEPORT, not listening."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def restart_delay(deaths):
    """Pause before restarting a worker that died young ``deaths`` times in a row."""
    return min(RESTART_DELAY_MAX, RESTART_DELAY_MIN * 2 ** max(0, deaths - 1))


@dataclass
class _Slot:
    """One of the K workers: its process (None while it waits to restart)."""

    pid: int | None = None
    started: float = 0.0
    deaths: int = 0
    restart_at: float = 0.0


class Supervisor:
    """Runs ``settings.workers`` workers until SIGTERM or SIGINT; see :meth:`run`.

    ``serve_worker(sock)`` runs in each forked worker with its bound
    (not yet listening) socket: it builds the app, serves until SIGTERM
    and returns once drained. ``on_worker_exit(pid)``, if given, runs in
    the supervisor once a worker has ended and been reaped.
    """

    def __init__(self, settings, serve_worker, *, on_worker_exit=None, clock=time.monotonic):
        self._settings = settings
        self._serve_worker = serve_worker
        self._on_worker_exit = on_worker_exit
        self._clock = clock
        self._slots = [_Slot() for _ in range(settings.workers)]
        self._stop_signal = None
        self._reserved = None
        self._wakeup = None
        self.port = None

    def run(self):
        """Supervise until told to stop; 0 if every worker drained in time."""
        claim_port(self._settings.host, self._settings.port)
        self._reserved = reuseport_socket(self._settings.host, self._settings.port)
        self.port = self._reserved.getsockname()[1]
        self._wakeup = os.pipe()
        for fd in self._wakeup:
            os.set_blocking(fd, False)
        previous = self._install_signals()
        try:
            logger.info("supervising %d workers on http://%s:%d (budgets are per worker)",
                        len(self._slots), self._settings.host, self.port)
            while self._stop_signal is None:
                self._reap(restart=True)
                self._start_due()
                self._sleep(self._next_restart())
            logger.info("%s: stopping %d workers", signal.Signals(self._stop_signal).name,
                        len(self._live()))
            return self._stop_all()
        finally:
            self._restore_signals(previous)
            for fd in self._wakeup:
                os.close(fd)
            self._reserved.close()

    # -- signals -------------------------------------------------------------

    def _install_signals(self):
        def stop(signum, frame):
            if self._stop_signal is None:
                self._stop_signal = signum

        previous = {sig: signal.getsignal(sig)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        # A handler of our own, so that a worker's death writes to the
        # wakeup pipe and interrupts the wait at once.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        previous["wakeup"] = signal.set_wakeup_fd(self._wakeup[1])
        return previous

    def _restore_signals(self, previous):
        signal.set_wakeup_fd(previous.pop("wakeup"))
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _sleep(self, timeout):
        """Until a signal arrives (a stop, a worker's death) or ``timeout``."""
        select.select([self._wakeup[0]], [], [], timeout)
        try:
            while os.read(self._wakeup[0], 512):
                pass
        except BlockingIOError:
            pass  # drained

    # -- workers ------------------------------------------------------------

    def _live(self):
        return [slot for slot in self._slots if slot.pid is not None]

    def _next_restart(self):
        waiting = [slot.restart_at for slot in self._slots if slot.pid is None]
        return max(0.0, min(waiting) - self._clock()) if waiting else None

    def _start_due(self):
        now = self._clock()
        for slot in self._slots:
            if slot.pid is None and slot.restart_at <= now:
                self._spawn(slot)

    def _spawn(self, slot):
        supervisor = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            slot.deaths += 1
            slot.restart_at = self._clock() + restart_delay(slot.deaths)
            logger.exception("cannot start a worker; trying again in %.1f s",
                             restart_delay(slot.deaths))
            return
        if pid == 0:
            self._become_worker(supervisor)  # never returns
        slot.pid, slot.started = pid, self._clock()
        logger.info("worker %d started", pid)

    def _become_worker(self, supervisor):
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # until serve() handles it
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in self._wakeup:
                os.close(fd)
            self._reserved.close()
            _exit_with(supervisor)
            code = self._serve_worker(
                reuseport_socket(self._settings.host, self.port)) or 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            logger.exception("worker %d failed", os.getpid())
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _reap(self, *, restart):
        """Collect the workers that ended; schedule their restart if asked."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self._slots if s.pid == pid), None)
            if slot is None:
                continue
            if self._on_worker_exit is not None:
                self._on_worker_exit(pid)
            now = self._clock()
            lived = now - slot.started
            slot.pid = None
            how = _describe(status)
            if not restart:
                logger.info("worker %d %s", pid, how)
                continue
            slot.deaths = slot.deaths + 1 if lived < STEADY_AFTER else 1
            delay = restart_delay(slot.deaths)
            slot.restart_at = now + delay
            logger.warning("worker %d %s after %.1f s; starting another in %.1f s",
                           pid, how, lived, delay)

    def _stop_all(self):
        for slot in self._live():
            _signal(slot.pid, signal.SIGTERM)
        settings = self._settings
        deadline = self._clock() + settings.shutdown_drain + settings.shutdown_timeout + STOP_GRACE
        while True:
            self._reap(restart=False)
            left = deadline - self._clock()
            if not self._live() or left <= 0:
                break
            self._sleep(left)
        stragglers = self._live()
        for slot in stragglers:
            logger.error("worker %d did not stop in time: killing it", slot.pid)
            _signal(slot.pid, signal.SIGKILL)
            os.waitpid(slot.pid, 0)
            slot.pid = None
        logger.info("all workers stopped")
        return 1 if stragglers else 0


def _exit_with(supervisor):
    """Have the kernel SIGTERM this worker when the supervisor dies (Linux),
    so that no orphan keeps serving the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: an orphan drains on its own SIGTERM
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # already gone; reaped next


def _describe(status):
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
