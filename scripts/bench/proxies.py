"""Varnish, nginx and Nchan in the foreground, for the fan-out's --via.

Varnish and nginx run the shipped configurations (deploy/), with only the
backend address, the listening port and the cache path replaced, as
tests/proxies.py does. Nchan is nginx with Debian's module: a long-poll
subscriber location and a publisher location, nothing of the service.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .server import ROOT, ServerProcess, free_port

VCL = ROOT / "deploy" / "varnish" / "livecomments.vcl"
NGINX_SITE = ROOT / "deploy" / "nginx" / "livecomments.conf"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


def binary_path(name):
    """The program's path, or None."""
    found = shutil.which(name) or f"/usr/sbin/{name}"
    return found if Path(found).exists() else None


def binary(name):
    found = binary_path(name)
    if found is None:
        raise SystemExit(f"bench: --via needs {name} (Debian package {name})")
    return found


def substitute(text, pattern, replacement):
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise RuntimeError(f"{pattern!r} matched {count} times in a shipped file")
    return new


def varnish(workdir, backend_port, *, log_path):
    """varnishd on the shipped VCL in front of the service on ``backend_port``."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    vcl = substitute(VCL.read_text(), r'^(\s*\.port = )"8080";', rf'\1"{backend_port}";')
    path = workdir / "livecomments.vcl"
    path.write_text(vcl)
    command = [binary("varnishd"), "-F", "-n", workdir / "varnish", "-a", f"127.0.0.1:{port}",
               "-f", path, "-s", "malloc,64m", "-T", "none",
               # Room for thousands of held viewers: one thread each while waiting.
               "-p", "thread_pool_max=5000", "-p", "thread_pools=1", "-p", "rush_exponent=32", "-p", "thread_pool_min=500"]
    if os.geteuid() == 0:
        command += ["-j", "none"]
    return ServerProcess(command, port, env=dict(os.environ), log_path=log_path,
                         health_path="/healthz")


MAIN = """\
{modules}{user}worker_processes 1;
worker_rlimit_nofile 32768;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    include {dir}/site.conf;
}}
"""

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


def _nginx(workdir, site, port, log_path, modules=""):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "site.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""
    (workdir / "nginx.conf").write_text(MAIN.format(modules=modules, user=user, dir=workdir))
    command = [binary("nginx"), "-p", workdir, "-c", workdir / "nginx.conf",
               "-g", "daemon off;"]
    return ServerProcess(command, port, env=dict(os.environ), log_path=log_path,
                         health_path="/healthz")


def nginx(workdir, backend_port, *, log_path):
    """nginx with the shipped site file in front of the service on ``backend_port``."""
    port = free_port()
    site = NGINX_SITE.read_text()
    site = substitute(site, r"^(\s*server )127\.0\.0\.1:8080;", rf"\g<1>127.0.0.1:{backend_port};")
    site = substitute(site, r"^(\s*listen )80;", rf"\g<1>127.0.0.1:{port};")
    site = substitute(site, r"/var/cache/nginx/livecomments", str(workdir / "nginx-cache"))
    return _nginx(workdir, site, port, log_path)


def nchan(workdir, *, log_path):
    """nginx with the Nchan module: /sub/{channel} (long-poll), /pub/{channel}."""
    if not NCHAN_MODULE.exists():
        raise SystemExit(f"bench: --via nchan needs {NCHAN_MODULE} (libnginx-mod-nchan)")
    port = free_port()
    return _nginx(workdir, NCHAN_SITE.format(port=port), port, log_path,
                  modules=f"load_module {NCHAN_MODULE};\n")
