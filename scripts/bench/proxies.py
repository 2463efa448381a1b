"""Varnish, nginx and Nchan in the foreground, for the fan-out's --via.

Varnish and nginx run the shipped configurations (deploy/), as
:mod:`.cacheconfig` builds them for the bench and the tests alike. Nchan
is nginx with Debian's module: a long-poll subscriber location and a
publisher location, nothing of the service.
"""

from __future__ import annotations

import os
from pathlib import Path

from .cacheconfig import binary_path, nginx_command, shipped_nginx_site, varnish_command
from .server import ServerProcess, free_port

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
    return ServerProcess(command, port, env=dict(os.environ), log_path=log_path,
                         health_path="/healthz")


NCHAN_SITE = """\
server {{
    listen 127.0.0.1:{port};
    location = /healthz {{ return 200 '{{}}'; }}
    # Long-poll subscribers; the cursor is If-Modified-Since / If-None-Match.
    location ~ ^/sub/(\\w+)$ {{
        nchan_subscriber longpoll;
        nchan_channel_id $1;
        nchan_subscriber_timeout 30s;
    }}
    location ~ ^/pub/(\\w+)$ {{
        nchan_publisher;
        nchan_channel_id $1;
        nchan_message_buffer_length 100;
        nchan_message_timeout 5m;
    }}
}}
"""


def _nginx(workdir, site, port, log_path, modules=()):
    command = nginx_command(binary("nginx"), workdir, site, connections=NGINX_CONNECTIONS,
                            modules=modules)
    return ServerProcess(command, port, env=dict(os.environ), log_path=log_path,
                         health_path="/healthz")


def nginx(workdir, backend_port, *, log_path):
    """nginx with the shipped site file in front of the service on ``backend_port``."""
    port = free_port()
    return _nginx(workdir, shipped_nginx_site(workdir, backend_port, port), port, log_path)


def nchan(workdir, *, log_path):
    """nginx with the Nchan module: /sub/{channel} (long-poll), /pub/{channel}."""
    if not NCHAN_MODULE.exists():
        raise SystemExit(f"bench: --via nchan needs {NCHAN_MODULE} (libnginx-mod-nchan)")
    port = free_port()
    return _nginx(workdir, NCHAN_SITE.format(port=port), port, log_path,
                  modules=[NCHAN_MODULE])
