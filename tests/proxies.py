"""Real Varnish and nginx in front of a test server, on the shipped configurations.

Each runs in the foreground as a child process with its work files in a
temporary directory. Their configurations are the bench's own
(``scripts/bench/cacheconfig.py``): the shipped files with only the
backend addresses (one service or several), the listening port and the
cache path replaced.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))
from bench.cacheconfig import (  # noqa: E402
    binary_path,
    nginx_command,
    shipped_nginx_site,
    varnish_command,
)

VARNISHD = binary_path("varnishd") or "varnishd"
NGINX = binary_path("nginx") or "nginx"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proxy:
    """A cache process listening on ``port``; :meth:`stop` ends it."""

    def __init__(self, name, args, port, workdir):
        self.name = name
        self.port = port
        self.workdir = workdir
        self._log = open(workdir / f"{name}.out", "wb")  # closed in stop()
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.output()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {timeout} s: {self.output()}")
            time.sleep(0.1)

    def output(self):
        self._log.flush()
        return (self.workdir / f"{self.name}.out").read_text(errors="replace")[-3000:]

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()


def start_varnish(workdir, backend_port, *, port=None):
    """varnishd on the shipped VCL, its hosts the services on ``backend_port``
    (a port, or several: one backend each in the director)."""
    port = port or free_port()
    return Proxy("varnish", varnish_command(VARNISHD, workdir, backend_port, port), port,
                 workdir)


def start_nginx(workdir, backend_port, *, port=None):
    """nginx with the shipped site file, its upstream the services on
    ``backend_port`` (a port, or several: one server line each)."""
    port = port or free_port()
    site = shipped_nginx_site(workdir, backend_port, port)
    return Proxy("nginx", nginx_command(NGINX, workdir, site), port, workdir)
