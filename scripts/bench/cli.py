"""Arguments and dispatch: ``bench COMMAND [options] [-- serve flags]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import dbload, event, fanout, feeds, report, throughput, timeouts

ROOT = Path(__file__).resolve().parents[2]

#: Command name → module with ``__doc__``, ``add_arguments(parser)`` and ``run(args)``.
COMMANDS = {"fanout": fanout, "throughput": throughput, "dbload": dbload, "event": event,
            "feeds": feeds, "timeouts": timeouts, "report": report}


def add_server_arguments(parser):
    """Options of the service under test, shared by every command that starts it."""
    group = parser.add_argument_group("the service under test")
    group.add_argument("--database-url", default=None,
                       help="PostgreSQL URL on 127.0.0.1 (a fresh schema per server is "
                       "created and dropped); default: a fresh SQLite file")
    group.add_argument("--threads", type=int, default=None,
                       help="serve --threads (default: the service's)")
    group.add_argument("--hold-budget", type=int, default=None,
                       help="serve --hold-budget (default: the service's)")
    group.add_argument("--poll-interval", type=float, default=None,
                       help="serve --poll-interval (default: the service's)")
    group.add_argument("--port", type=int, default=0, help="service port (default: a free one)")
    group.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                       help="extra `livecomments serve` flag, repeatable, e.g. "
                       "--server-arg=--feed-window=500; or put them after `--`")


def add_output_arguments(parser):
    group = parser.add_argument_group("results")
    group.add_argument("--results-dir", type=Path, default=ROOT / "bench-results",
                       help="where the JSON and the server logs go (default %(default)s)")
    group.add_argument("--json", type=Path, default=None, metavar="PATH",
                       help="JSON results file (default: RESULTS_DIR/COMMAND-DATE.json)")
    group.add_argument("--label", default="", help="free text recorded in the results")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description="The project's benchmarks. Run from the repository "
        "root with the venv's python (.venv/bin/python scripts/bench COMMAND --help).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        summary, _, details = module.__doc__.partition("\n\n")
        sub = commands.add_parser(name, help=summary, description=summary, epilog=details,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        add_server_arguments(sub)
        add_output_arguments(sub)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after a bare `--` goes to `livecomments serve` untouched.
    passthrough = []
    if "--" in argv:
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1:]
    args = build_parser().parse_args(argv)
    args.server_args = [*args.server_arg, *passthrough]
    args.argv = argv + (["--", *passthrough] if passthrough else [])
    return COMMANDS[args.command].run(args)
