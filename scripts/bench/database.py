"""A fresh database per server: a SQLite file, or a PostgreSQL schema dropped after."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import sqlalchemy as sa

from .dbstats import TransactionCounter

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", None, "")


def fresh_database(url, directory):
    """A new, empty database: PostgreSQL if ``url`` names one, else SQLite in ``directory``."""
    if not url:
        return SqliteDatabase(directory)
    if not url.startswith("postgresql"):
        raise SystemExit(f"bench: --database-url takes a PostgreSQL URL, not {url!r}")
    return PostgresDatabase(url)


class SqliteDatabase:
    kind = "sqlite"

    def __init__(self, directory):
        self.path = Path(directory) / f"livecomments-{uuid.uuid4().hex[:8]}.db"
        self.url = f"sqlite:///{self.path}"

    def create(self, env, *, command=None, cwd=None):
        """Nothing to do: ``serve`` creates the schema in an empty SQLite file."""

    def counter(self):
        return None  # SQLite has no server-side transaction counter

    def drop(self):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)


class PostgresDatabase:
    """A fresh schema in the given database, reached with ``options=-csearch_path``."""

    kind = "postgresql"

    def __init__(self, base_url):
        base = sa.engine.make_url(base_url)
        if base.host not in LOCAL_HOSTS:
            raise SystemExit(f"bench: only talks to 127.0.0.1, not {base.host!r}")
        self.name = f"lc_bench_{uuid.uuid4().hex[:12]}"
        self.base, self.url = self._place(base)
        self._admin = sa.create_engine(base, isolation_level="AUTOCOMMIT",
                                       connect_args={"connect_timeout": 5})
        self._created = False

    def _place(self, base):
        """(URL for transaction counts, URL the service runs on)."""
        url = base.update_query_dict({"options": f"-csearch_path={self.name}"})
        return base, url.render_as_string(hide_password=False)

    def _create_sql(self):
        return f"CREATE SCHEMA {self.name}"

    def _drop_sql(self):
        return f"DROP SCHEMA IF EXISTS {self.name} CASCADE"

    def create(self, env, *, command=None, cwd=None):
        """Create the schema with ``command`` (``livecomments`` of this checkout
        by default; a revision's own, whose schema version may differ) ``init-db``."""
        with self._admin.connect() as conn:
            conn.exec_driver_sql(self._create_sql())
        self._created = True
        command = command or [Path(sys.prefix) / "bin" / "livecomments"]
        result = subprocess.run([*command, "init-db", "--database-url", self.url], env=env,
                                cwd=cwd, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"livecomments init-db failed: {result.stderr or result.stdout}")

    def counter(self):
        return TransactionCounter(self.base)

    def drop(self):
        try:
            if self._created:
                with self._admin.connect() as conn:
                    conn.exec_driver_sql(self._drop_sql())
                self._created = False
        finally:
            self._admin.dispose()


class PrivateDatabase(PostgresDatabase):
    """A PostgreSQL database of its own, so that pg_stat_database counts
    nothing but this run (other clients of a shared database would count)."""

    def _place(self, base):
        own = base.set(database=self.name)
        return own, own.render_as_string(hide_password=False)

    def _create_sql(self):
        return f"CREATE DATABASE {self.name}"

    def _drop_sql(self):
        return f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)"
