"""HTTP servers in subprocesses: start, wait for health, read CPU and RSS, stop."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def serve_flags(args):
    """`livecomments serve` flags from the bench's options for the service."""
    flags = []
    for name in ("threads", "hold_budget", "poll_interval"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags + list(args.server_args)


def settings_from_flags(flags, environ):
    """The Settings `livecomments serve FLAGS` would run with (the service's own parser)."""
    from service.cli import build_parser
    from service.config.settings import Settings

    parsed = build_parser().parse_args(["serve", *flags])
    overrides = {name: getattr(parsed, name) for name in Settings.__dataclass_fields__
                 if getattr(parsed, name, None) is not None}
    return Settings.from_env(environ=environ, **overrides)


def service_environ():
    """The environment for servers: no LIVECOMMENTS_* of the caller, a secret,
    no post limit, the bench's own address trusted."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOMMENTS_")}
    env["LIVECOMMENTS_SECRET"] = secrets.token_urlsafe(32)
    env["LIVECOMMENTS_POST_RATE"] = "0"
    # Every viewer connects from this one address: exempt it from the
    # per-address connection cap, as a proxy in front would be.
    env["LIVECOMMENTS_TRUSTED_PROXIES"] = HOST
    return env


@dataclass
class Usage:
    """A server process's CPU seconds so far and resident memory now."""

    cpu_s: float
    rss_mb: float


class ServerProcess:
    """A server subprocess on 127.0.0.1:``port`` that answers ``GET /healthz``."""

    def __init__(self, command, port, *, env, log_path, cwd=ROOT, health_path="/healthz"):
        self.command = [str(part) for part in command]
        self.port = port
        self.health_path = health_path
        self.env = env
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.proc = None
        self._ps = None

    @property
    def url(self):
        return f"http://{HOST}:{self.port}"

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=60.0):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.command[0]} exited with {self.proc.returncode}; "
                                   f"see {self.log_path}")
            if self.health(timeout=2.0) is not None:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"no answer on {self.url}/healthz in {timeout:.0f} s; "
                           f"see {self.log_path}")

    def health(self, timeout=5.0):
        """The /healthz document, or None if the server does not answer 200."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request("GET", self.health_path)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
        return json.loads(body) if resp.status == 200 else None

    def usage(self):
        """CPU seconds and RSS of the process and its children (workers)."""
        cpu = rss = 0.0
        for process in [self._ps, *self._ps.children(recursive=True)]:
            try:
                times = process.cpu_times()
                cpu += times.user + times.system
                rss += process.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                pass  # a worker that ended meanwhile
        return Usage(cpu, rss)

    def stop(self, grace=10.0):
        """SIGTERM (the service answers its held viewers), SIGKILL after ``grace``."""
        if not self.alive:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


def service(database_url, flags, *, env, log_path, port=0):
    """``livecomments serve`` of this checkout's venv."""
    port = port or free_port()
    command = [Path(sys.prefix) / "bin" / "livecomments", "serve", "--port", port,
               "--database-url", database_url, *flags]
    return ServerProcess(command, port, env=env, log_path=log_path)


def hello(flags, *, env, log_path):
    """The bench's hello-world app (``bench.hello``) with the same serve flags."""
    port = free_port()
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "scripts"),
                                                              env.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "bench.hello", *flags, "--port", port]
    return ServerProcess(command, port, env=env, log_path=log_path)


def waitress_settings(settings):
    """The waitress options the service (and the ceiling app) run with."""
    from service.serve.server import waitress_options

    return {k: v for k, v in waitress_options(settings).items() if k not in ("host", "port")}
