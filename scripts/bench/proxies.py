"""Varnish, nginx and Nchan in the foreground, for --via (fanout, event).

Varnish and nginx run the shipped configurations (deploy/), as
:mod:`.cacheconfig` builds them for the bench and the tests alike. Nchan
is nginx with Debian's module: a long-poll subscriber location and a
publisher location, nothing of the service; ``nchan-multipart`` is the
same with ``nchan_longpoll_multipart_response on`` (an answer carries every
message since the subscriber's cursor).

Each proxy keeps its logs beside the run's: its output in ``NAME.log``
(``log_path``), nginx's error log in ``NAME.error.log``, Varnish's counters
at the end (``varnishstat -1 -j``) in ``NAME.varnishstat.json``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .cacheconfig import binary_path, nginx_command, shipped_nginx_site, varnish_command
from .server import HOST, ServerProcess, free_port

#: What the viewers may talk to: the service, a shipped cache in front of
#: it, or Nchan (no service) with multipart answers off and on.
VIAS = ("direct", "varnish", "nginx", "nchan", "nchan-multipart")
CACHES = ("varnish", "nginx")
NCHANS = ("nchan", "nchan-multipart")


def vias(text):
    """``direct,varnish`` → ["direct", "varnish"] (an argparse type)."""
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    if not chosen or set(chosen) - set(VIAS):
        raise ValueError(text)
    return chosen


def service_flags(via):
    """`serve` flags for the service behind ``via``: a cache in front keeps
    feed answers (shared-cache mode, N = 1) and is a trusted proxy."""
    if via in CACHES:
        return ["--shared-cache-seconds", "1", "--trusted-proxies", HOST]
    return []


def front(via, workdir, backend_port, *, log_path):
    """The cache ``via`` names, in front of the service on ``backend_port``
    (a context manager: started on entry, stopped and its logs kept on exit)."""
    start = {"varnish": varnish, "nginx": nginx}[via]
    return start(workdir, backend_port, log_path=log_path)


class Proxy(ServerProcess):
    """A proxy in its work directory; on stop its logs are copied beside ``log_path``."""

    def __init__(self, command, port, *, workdir, log_path, varnish=False):
        super().__init__(command, port, env=dict(os.environ), log_path=log_path,
                         health_path="/healthz")
        self.workdir = Path(workdir)
        self.varnish = varnish

    def stop(self, grace=10.0):
        if self.alive and self.varnish:
            self._varnishstat()
        super().stop(grace)
        error_log = self.workdir / "error.log"
        if error_log.exists():
            shutil.copyfile(error_log, self.log_path.with_suffix(".error.log"))

    def _varnishstat(self):
        program = binary_path("varnishstat")
        if program is None:
            return
        try:
            stat = subprocess.run([program, "-n", str(self.workdir / "varnish"), "-1", "-j"],
                                  capture_output=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return
        self.log_path.with_suffix(".varnishstat.json").write_bytes(stat.stdout)

NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
#: Open connections per nginx worker: thousands of held viewers.
NGINX_CONNECTIONS = 16384
#: Room for thousands of held viewers in Varnish: one thread each while waiting.
VARNISH_PARAMS = ("thread_pool_max=5000", "thread_pools=1", "rush_exponent=32",
                  "thread_pool_min=500")


def binary(name):
    found = binary_path(name)
    if found is None:
        raise SystemExit(f"bench: --via needs {name} (Debian package {name})")
    return found


def varnish(workdir, backend_port, *, log_path):
    """varnishd on the shipped VCL in front of the service on ``backend_port``."""
    port = free_port()
    command = varnish_command(binary("varnishd"), workdir, backend_port, port,
                              params=VARNISH_PARAMS)
    return Proxy(command, port, workdir=workdir, log_path=log_path, varnish=True)


NCHAN_SITE = """\
server {{
    listen 127.0.0.1:{port};
    location = /healthz {{ return 200 '{{}}'; }}
    # Long-poll subscribers; the cursor is If-Modified-Since / If-None-Match.
    location ~ ^/sub/(\\w+)$ {{
        nchan_subscriber longpoll;
        nchan_longpoll_multipart_response {multipart};
        nchan_channel_id $1;
        nchan_subscriber_timeout 30s;
    }}
    location ~ ^/pub/(\\w+)$ {{
        nchan_publisher;
        nchan_channel_id $1;
        # Every message of a bench run (an event's 20/s for a minute is
        # 1,200): a subscriber that falls behind the buffer silently skips
        # to its oldest message, which the bench would count as missing.
        nchan_message_buffer_length 5000;
        nchan_message_timeout 5m;
    }}
}}
"""


def _nginx(workdir, site, port, log_path, modules=()):
    command = nginx_command(binary("nginx"), workdir, site, connections=NGINX_CONNECTIONS,
                            modules=modules)
    return Proxy(command, port, workdir=workdir, log_path=log_path)


def nginx(workdir, backend_port, *, log_path):
    """nginx with the shipped site file in front of the service on ``backend_port``."""
    port = free_port()
    return _nginx(workdir, shipped_nginx_site(workdir, backend_port, port), port, log_path)


def nchan(workdir, *, log_path, multipart=False):
    """nginx with the Nchan module: /sub/{channel} (long-poll), /pub/{channel};
    ``multipart``: an answer carries every message since the cursor."""
    if not NCHAN_MODULE.exists():
        raise SystemExit(f"bench: --via nchan needs {NCHAN_MODULE} (libnginx-mod-nchan)")
    port = free_port()
    site = NCHAN_SITE.format(port=port, multipart="on" if multipart else "off")
    return _nginx(workdir, site, port, log_path, modules=[NCHAN_MODULE])
