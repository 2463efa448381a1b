"""The shipped cache configurations (``deploy/``), made runnable on this host.

Varnish runs the shipped VCL and nginx the shipped site file, with only the
backend port, the listening address and the cache path replaced (a shipped
file that no longer matches fails loudly), in a work directory of their
own. The one place that builds them, for the bench's ``--via``
(:mod:`bench.proxies`) and for the tests (``tests/proxies.py``, which import
it with ``scripts/`` on their path): the standard library only, so the
tests need no bench extra.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VCL = ROOT / "deploy" / "varnish" / "livecomments.vcl"
NGINX_SITE = ROOT / "deploy" / "nginx" / "livecomments.conf"
HOST = "127.0.0.1"


def binary_path(name):
    """The program's path (on PATH, else in /usr/sbin or /sbin), or None:
    an executable file, as ``tests/components.require_program`` finds it."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def substitute(text, pattern, replacement):
    """``text`` with the one match of ``pattern`` replaced."""
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise RuntimeError(f"{pattern!r} matched {count} times in a shipped file")
    return new


def varnish_command(varnishd, workdir, backend_port, port, *, params=()):
    """Write the shipped VCL, its backend the service on ``backend_port``, to
    ``workdir``; return the command running ``varnishd`` in the foreground
    on ``port``, with each ``name=value`` of ``params`` set."""
    workdir.mkdir(parents=True, exist_ok=True)
    vcl = substitute(VCL.read_text(), r'^(\s*\.port = )"8080";', rf'\1"{backend_port}";')
    path = workdir / "livecomments.vcl"
    path.write_text(vcl)
    command = [varnishd, "-F", "-n", str(workdir / "varnish"), "-a", f"{HOST}:{port}",
               "-f", str(path), "-s", "malloc,64m", "-T", "none"]
    for param in params:
        command += ["-p", param]
    if os.geteuid() == 0:
        command += ["-j", "none"]  # no unprivileged users to drop to here
    return command


#: nginx's main configuration around a site: every path in the work
#: directory, logs there, no access log.
NGINX_MAIN = """\
{modules}{user}worker_processes 1;
worker_rlimit_nofile {files};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {connections}; }}
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


def shipped_nginx_site(workdir, backend_port, port):
    """The shipped site file in front of the service on ``backend_port``,
    listening on ``port``, its cache in ``workdir``."""
    site = NGINX_SITE.read_text()
    site = substitute(site, r"^(\s*server )127\.0\.0\.1:8080;", rf"\g<1>{HOST}:{backend_port};")
    site = substitute(site, r"^(\s*listen )80;", rf"\g<1>{HOST}:{port};")
    return substitute(site, r"/var/cache/nginx/livecomments", str(workdir / "nginx-cache"))


def nginx_command(nginx, workdir, site, *, connections=8192, modules=()):
    """Write ``site`` and a main configuration around it to ``workdir``;
    return the command running ``nginx`` in the foreground. ``connections``
    per worker (twice that in open files); ``modules``: paths to load."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "site.conf").write_text(site)
    loads = "".join(f"load_module {module};\n" for module in modules)
    user = "user root;\n" if os.geteuid() == 0 else ""  # else workers are nobody
    (workdir / "nginx.conf").write_text(NGINX_MAIN.format(
        modules=loads, user=user, dir=workdir, connections=connections, files=2 * connections))
    return [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"]
