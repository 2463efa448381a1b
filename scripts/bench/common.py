"""What every command shares: the event loop, progress lines, tokens, open
files, and the state of one run (:class:`BenchRun`)."""

from __future__ import annotations

import asyncio
import resource
import sys
from datetime import datetime

from . import server


def run_async(make_coroutine):
    """Run ``make_coroutine(loop name)`` on uvloop when installed; return its result."""
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(make_coroutine("uvloop" if loop_factory else "asyncio"))


def raise_open_files(wanted):
    """This process will open ``wanted`` sockets: raise the soft limit towards it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            try:  # allowed to root: the servers started from here inherit it
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
                return
            except (ValueError, OSError):
                pass
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted), hard))


def progress(text):
    print(f"[{datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def mint_token(env, author_id=1):
    from service.web.auth import TokenSigner

    return TokenSigner(env["LIVECOMMENTS_SECRET"]).mint(author_id, "user", 3600)


def stamp():
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def counts(text):
    """``100,1_000`` → [100, 1000] (an argparse type)."""
    values = [int(v) for v in text.replace("_", "").split(",") if v]
    if not values or min(values) < 1:
        raise ValueError(text)
    return values


class BenchRun:
    """One command's run: its arguments, the service's environment, flags
    and settings (the service's own parser: settings it would refuse stop
    the bench here), a stamp naming its files, and its result rows."""

    #: The command's name, first in its files' names.
    command = "bench"

    def __init__(self, args, loop_name):
        self.args = args
        self.loop_name = loop_name
        self.stamp = stamp()
        self.env = server.service_environ()
        self.flags = server.serve_flags(args)
        self.settings = server.settings_from_flags(self.flags, self.env)
        self.rows = []

    def log_path(self, name):
        return self.args.results_dir / f"{self.command}-{self.stamp}-{name}.log"
