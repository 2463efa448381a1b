"""The shipped cache configurations (``deploy/``), made runnable on this host.

Varnish runs the shipped VCL and nginx the shipped site file, with only the
service hosts (one backend port or several: the shipped first backend block
or upstream server line, once per port), the listening address and the
cache path replaced (a shipped file that no longer matches fails loudly),
in a work directory of their own. The one place that builds them, for the bench's ``--via``
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


def backend_ports(backend_port):
    """``backend_port``, one port or several, as a list of ports."""
    if isinstance(backend_port, int):
        return [backend_port]
    ports = list(backend_port)
    if not ports:
        raise ValueError("no backend port")
    return ports


#: The shipped VCL's backend blocks (``backend hostN { ... }``) and the
#: director's ``hosts.add_backend(hostN);`` lines.
VCL_BACKEND = re.compile(r"^backend host\d+ \{\n.*?^\}\n\n", re.MULTILINE | re.DOTALL)
VCL_ADD_BACKEND = re.compile(r"^(\s*)hosts\.add_backend\(host\d+\);\n", re.MULTILINE)


def shipped_vcl(backend_port):
    """The shipped VCL, its hosts the services on ``backend_port`` (one port
    or several): the first backend block, once per port, and each added to
    the director."""
    ports = backend_ports(backend_port)
    vcl = VCL.read_text()
    blocks = VCL_BACKEND.findall(vcl)
    adds = VCL_ADD_BACKEND.findall(vcl)
    if not blocks or len(adds) != len(blocks):
        raise RuntimeError(f"{len(blocks)} backend blocks and {len(adds)} add_backend lines "
                           "in the shipped VCL")
    template = blocks[0]
    backends = "".join(
        substitute(template.replace("backend host1 ", f"backend host{n} "),
                   r'^(\s*\.port = )"\d+";', rf'\1"{port}";')
        for n, port in enumerate(ports, 1))
    indent = adds[0]
    added = "".join(f"{indent}hosts.add_backend(host{n});\n" for n in range(1, len(ports) + 1))
    return in_place_of_all(VCL_ADD_BACKEND, added, in_place_of_all(VCL_BACKEND, backends, vcl))


def in_place_of_all(pattern, replacement, text):
    """``text`` with ``replacement`` at the first match of ``pattern`` and
    the other matches removed."""
    first = pattern.search(text)
    return text[:first.start()] + replacement + pattern.sub("", text[first.end():])


def varnish_command(varnishd, workdir, backend_port, port, *, params=()):
    """Write the shipped VCL, its hosts the services on ``backend_port`` (one
    port or several), to ``workdir``; return the command running
    ``varnishd`` in the foreground on ``port``, with each ``name=value`` of
    ``params`` set."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "livecomments.vcl"
    path.write_text(shipped_vcl(backend_port))
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


#: The shipped site's upstream servers (``server 127.0.0.1:8080 ...;``).
NGINX_SERVER = re.compile(r"^(\s*server )127\.0\.0\.1:\d+(.*;\n)", re.MULTILINE)


def shipped_nginx_site(workdir, backend_port, port):
    """The shipped site file in front of the services on ``backend_port``
    (one port or several: the first server line, once per port), listening
    on ``port``, its cache in ``workdir``."""
    site = NGINX_SITE.read_text()
    first = NGINX_SERVER.search(site)
    if first is None:
        raise RuntimeError("no upstream server line in the shipped site file")
    servers = "".join(f"{first[1]}{HOST}:{backend}{first[2]}"
                      for backend in backend_ports(backend_port))
    site = in_place_of_all(NGINX_SERVER, servers, site)
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
