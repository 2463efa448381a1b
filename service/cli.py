"""The ``livecomments`` command: ``serve``, ``init-db``, ``mint-token``."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import sys

from .config.secret import DEV_SECRET_FILE, read_dev_secret
from .config.settings import Settings, SettingsError

logger = logging.getLogger("service")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# With --workers, each line says whose it is.
_WORKERS_LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
#: Settings that the database-only verbs accept as flags too.
_DB_FLAGS = ("database_url",)


def _add_setting_flags(parser, names=None):
    for f in dataclasses.fields(Settings):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_const", const="1",
                                help=f"{f.metadata['help']} (${f.metadata['env']})")
        else:
            metavar = f.metadata["metavar"] or f.name.split("_")[-1].upper()
            parser.add_argument(flag, dest=f.name, metavar=metavar,
                                help=f"{f.metadata['help']} (${f.metadata['env']}, "
                                f"default {show_default(f)})")


def show_default(f, *, markdown=False):
    """A setting's default as the help and the README show it."""
    if f.metadata["derived"]:
        return f.metadata["derived"] if markdown else f"derived: {f.metadata['derived']}"
    value = f.default
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        value = int(value)
    elif isinstance(value, tuple) and len(value) == 2 and not isinstance(value[0], str):
        value = f"{value[0]}/{value[1]:g}"
    return f"`{value}`" if markdown else str(value)


def settings_table():
    """The README's configuration table, in Markdown, from the declarations."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        rows.append(f"| `{f.metadata['env']}` | {show_default(f, markdown=True)} "
                    f"| {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="livecomments", description="Live comments over HTTP long-polling."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    serve = verbs.add_parser("serve", help="run the service on waitress")
    _add_setting_flags(serve)
    init_db = verbs.add_parser(
        "init-db", help="create the database schema, or upgrade it to this version's")
    _add_setting_flags(init_db, _DB_FLAGS)
    mint = verbs.add_parser("mint-token", help="print a signed bearer token")
    mint.add_argument("--author-id", type=int, required=True)
    mint.add_argument("--role", choices=("user", "moderator"), default="user")
    mint.add_argument("--ttl", type=int, default=86400, help="seconds the token is valid")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Settings)
        if hasattr(args, f.name)
    }
    try:
        settings = Settings.from_env(**overrides)
        return _VERBS[args.verb](settings, args)
    except SettingsError as exc:
        print(f"livecomments: {exc}", file=sys.stderr)
        return 2


def _serve(settings, args):
    from .app import create_app
    from .serve.server import serve
    from .serve.workers import claim_port

    if not settings.secret:
        settings.resolve_secret()  # refuses without dev mode
        logger.warning(
            "\n" + "!" * 72 + "\n"
            "DEVELOPMENT MODE: LIVECOMMENTS_SECRET is not set; tokens are signed with\n"
            "a generated secret kept in ./%s. Never run this in production.\n"
            + "!" * 72,
            DEV_SECRET_FILE,
        )
    try:
        # Before the database is touched or a thread started.
        claim_port(settings.host, settings.port)
        refused = _schema_refused(settings)
        if refused:
            print(f"livecomments: {refused}", file=sys.stderr)
            return 2
        if settings.workers > 1:
            return _supervise(settings)
        app = create_app(settings)
        serve(app, settings)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        # One line, not a traceback: the operator's mistake, not ours.
        print(f"livecomments: address in use: {settings.host}:{settings.port} is served by "
              "another process (another instance?); stop it or choose another --port",
              file=sys.stderr)
        return 1
    return 0


def _supervise(settings):
    """``--workers K``: fork K workers, each with an app of its own, all
    writing their metrics to one directory (``metrics_dir``)."""
    from .app import create_app
    from .serve.server import serve
    from .serve.workers import Supervisor
    from .web import metrics

    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(_WORKERS_LOG_FORMAT))

    def serve_worker(sock):
        serve(create_app(settings), settings, sockets=[sock])
        return 0

    # Before the first fork: every worker writes its metrics there.
    created = metrics.prepare_multiprocess_dir(settings.metrics_dir)
    try:
        supervisor = Supervisor(settings, serve_worker, on_worker_exit=metrics.process_dead)
        return supervisor.run()
    finally:
        metrics.remove_multiprocess_dir(created)


def _schema_refused(settings):
    """Why the database cannot be served by this code (SQLite is upgraded
    here, as the app would), or None. Checked once before any worker starts."""
    from .common.errors import StoreUnavailable
    from .db.schema import SchemaError
    from .db.store import Store

    store = Store.from_settings(settings)
    try:
        if settings.is_sqlite:
            store.create_schema()
        store.check_schema()
    except SchemaError as exc:
        return str(exc)
    except StoreUnavailable as exc:
        # A database that is not there (or refuses us): one line, not a traceback.
        return f"cannot reach the database: {exc}"
    finally:
        store.dispose()
    return None


def _init_db(settings, args):
    from .db.schema import SchemaError
    from .db.store import Store

    def step(migration):
        print(f"applying schema version {migration.version} ({migration.name})")

    store = Store.from_settings(settings)
    try:
        before, after = store.create_schema(on_step=step)
    except SchemaError as exc:
        print(f"livecomments: {exc}", file=sys.stderr)
        return 1
    finally:
        store.dispose()
    upgraded = "" if before == after else f" (was {before or 'unversioned'})"
    print(f"schema ready on {store.dialect}: version {after}{upgraded}")
    return 0


def _mint_token(settings, args):
    from .web.auth import TokenSigner

    secret = settings.secret
    if not secret:
        # The development server's generated secret, from the same directory.
        secret = read_dev_secret()
        if secret:
            print(f"livecomments: signing with the development secret in ./{DEV_SECRET_FILE}",
                  file=sys.stderr)
        else:
            secret = settings.resolve_secret()
    try:
        print(TokenSigner(secret).mint(args.author_id, args.role, args.ttl))
    except ValueError as exc:
        print(f"livecomments: {exc}", file=sys.stderr)
        return 2
    return 0


_VERBS = {"serve": _serve, "init-db": _init_db, "mint-token": _mint_token}
