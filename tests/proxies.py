"""Real Varnish and nginx in front of a test server, on the shipped configurations.

Each runs in the foreground as a child process with its work files in a
temporary directory; only the backend address, the listening port and the
paths of the shipped file are replaced.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VCL = REPO / "deploy" / "varnish" / "livecomments.vcl"
NGINX_SITE = REPO / "deploy" / "nginx" / "livecomments.conf"
VARNISHD = shutil.which("varnishd") or "/usr/sbin/varnishd"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def substitute(text, pattern, replacement):
    """``text`` with the one match of ``pattern`` replaced (the shipped file changed if not)."""
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, f"{pattern!r} matched {count} times in a shipped file"
    return new


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
    """varnishd on the shipped VCL, its backend the service on ``backend_port``."""
    port = port or free_port()
    vcl = VCL.read_text()
    vcl = substitute(vcl, r'^(\s*\.port = )"8080";', rf'\1"{backend_port}";')
    path = workdir / "livecomments.vcl"
    path.write_text(vcl)
    args = [VARNISHD, "-F", "-n", str(workdir / "varnish"), "-a", f"127.0.0.1:{port}",
            "-f", str(path), "-s", "malloc,64m", "-T", "none"]
    if os.geteuid() == 0:
        args += ["-j", "none"]  # no unprivileged users to drop to in a test
    return Proxy("varnish", args, port, workdir)


NGINX_MAIN = """\
{user}worker_processes 1;
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    include {dir}/livecomments.conf;
}}
"""


def start_nginx(workdir, backend_port, *, port=None):
    """nginx with the shipped site file, its upstream the service on ``backend_port``."""
    port = port or free_port()
    site = NGINX_SITE.read_text()
    site = substitute(site, r"^(\s*server )127\.0\.0\.1:8080;", rf"\g<1>127.0.0.1:{backend_port};")
    site = substitute(site, r"^(\s*listen )80;", rf"\g<1>127.0.0.1:{port};")
    site = substitute(site, r"/var/cache/nginx/livecomments", str(workdir / "nginx-cache"))
    (workdir / "livecomments.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""  # else workers are nobody
    (workdir / "nginx.conf").write_text(NGINX_MAIN.format(user=user, dir=workdir))
    args = [NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"]
    return Proxy("nginx", args, port, workdir)
