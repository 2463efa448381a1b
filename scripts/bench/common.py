"""What every command shares: the event loop, progress lines, tokens, open files."""

from __future__ import annotations

import asyncio
import resource
import sys
from datetime import datetime


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
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted), hard))


def progress(text):
    print(f"[{datetime.now():%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def mint_token(env, author_id=1):
    from service.auth import TokenSigner

    return TokenSigner(env["LIVECOMMENTS_SECRET"]).mint(author_id, "user", 3600)


def stamp():
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def counts(text):
    """``100,1_000`` → [100, 1000] (an argparse type)."""
    values = [int(v) for v in text.replace("_", "").split(",") if v]
    if not values or min(values) < 1:
        raise ValueError(text)
    return values
