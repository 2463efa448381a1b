"""Outside programs some tests drive: nginx in front of the server, busybox.

A missing program skips its tests with the reason shown, except under
``CI=true``, where it fails them: CI installs them (``.ci/run``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager

import pytest
from conftest import IN_CI


def require_program(name, package=None):
    """The program's path; skip (fail under CI) if it is not installed."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        reason = f"{name} is not installed (apt-get install {package or name})"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return path


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            {extra}
        }}
    }}
}}
"""

#: A proxy that buffers streams whatever the upstream asks: it ignores
#: ``X-Accel-Buffering: no`` (as some CDNs and corporate proxies do).
BUFFERING = "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;"


@contextmanager
def nginx(tmp_path, upstream_port, extra=""):
    """nginx on a free port, ``proxy_pass`` to the upstream with its
    defaults plus ``extra``; yields the port."""
    binary = require_program("nginx")
    directory = tmp_path / f"nginx-{upstream_port}-{len(extra)}"
    directory.mkdir()
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, port=port, upstream=upstream_port,
                                      extra=extra))
    process = subprocess.Popen([binary, "-c", str(conf), "-p", str(directory)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(
                        f"nginx did not start: {process.communicate()[1]!r}") from None
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
