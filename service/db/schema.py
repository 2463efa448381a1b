"""Schema versions: which one a database is at, and the migrations to the latest.

A database records its version in ``schema_version`` (one row). Version 1
is the baseline: ``schema.sql`` on PostgreSQL,
``migrations/0001_baseline.sqlite.sql`` on SQLite. Every later version is a
file ``migrations/NNNN_name.sql`` run by both databases, or a pair
``NNNN_name.postgresql.sql`` and ``NNNN_name.sqlite.sql`` side by side where
their SQL must differ. So a fresh schema is the baseline plus every
migration: one home, which ``tests/test_schema.py`` compares with
:mod:`~service.db.tables`' metadata (what the code reads and writes).

:func:`migrate` applies the missing versions in order, each in a
transaction of its own with the new version number, so a failure leaves
the database at the last version that worked. Concurrent runs queue (an
advisory lock on PostgreSQL, SQLite's write lock) and the later finds
nothing left to do. A database without ``schema_version`` (one made
before versions existed, or an empty one) counts as version 0: the
baseline runs, creating only what is missing (``IF NOT EXISTS``), and
stamps it version 1; its comments and seqs are not touched.

A database at a version newer than this code knows is refused
(:class:`SchemaTooNew`): the code would misread it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from ..config.datafiles import data_file

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: PostgreSQL's baseline, shipped beside the package (and as data, installed).
POSTGRESQL_BASELINE = "schema.sql"
#: The advisory lock that queues concurrent migrations on PostgreSQL.
_PG_LOCK_KEY = 0x6C63_5348  # "lcSH"
_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+?)(?:\.(postgresql|sqlite))?\.sql")


class SchemaError(Exception):
    """The database's schema does not fit this code; the message says what to do."""


class SchemaTooNew(SchemaError):
    """The database is at a version this code does not know."""


class SchemaTooOld(SchemaError):
    """The database needs ``livecomments init-db`` before this code can serve it."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    #: {dialect name: SQL}
    sql: dict


def migrations():
    """Every version's migration, in order: {version: Migration}."""
    found = {}
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise SchemaError(f"{path.name}: not a migration's name (NNNN_name[.dialect].sql)")
        version, name, dialect = int(match[1]), match[2], match[3]
        migration = found.setdefault(version, Migration(version, name, {}))
        for each in ([dialect] if dialect else ["postgresql", "sqlite"]):
            migration.sql[each] = path.read_text()
    found.setdefault(1, Migration(1, "baseline", {}))
    found[1].sql["postgresql"] = data_file(POSTGRESQL_BASELINE).read_text()
    if sorted(found) != list(range(1, len(found) + 1)):
        raise SchemaError(f"migrations are not numbered 1, 2, 3, …: {sorted(found)}")
    for migration in found.values():
        if set(migration.sql) != {"postgresql", "sqlite"}:
            raise SchemaError(f"migration {migration.version} lacks a dialect's SQL")
    return found


#: The version this code reads and writes.
LATEST = max(migrations())


def statements(sql):
    """The statements of a migration's SQL, one by one (SQLite's driver
    runs one at a time): comments dropped, split at semicolons. Migrations
    put no ``--`` or ``;`` inside a string."""
    text = re.sub(r"--[^\n]*", "", sql)
    return [part.strip() for part in text.split(";") if part.strip()]


def current_version(conn):
    """The database's version: 0 when it has no ``schema_version`` row
    (empty, or made before versions)."""
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    return conn.exec_driver_sql("SELECT max(version) FROM schema_version").scalar() or 0


def check(version):
    """Raise :class:`SchemaTooNew` or :class:`SchemaTooOld` unless ``version`` is :data:`LATEST`."""
    if version > LATEST:
        raise SchemaTooNew(
            f"the database is at schema version {version}, newer than this code's "
            f"{LATEST}: run the release that upgraded it (or a newer one)")
    if version < LATEST:
        raise SchemaTooOld(
            f"the database is at schema version {version} and this code needs "
            f"{LATEST}: run `livecomments init-db` to upgrade it")


def migrate(engine, *, on_step=None):
    """Bring the database to :data:`LATEST`; (version before, version after).

    ``engine`` should take SQLite's write lock at BEGIN (the store's
    writer does). ``on_step(migration)`` is called before each is applied.
    Raises :class:`SchemaTooNew` (changing nothing) for a newer database.
    """
    steps = migrations()
    dialect = engine.dialect.name
    before = None
    while True:
        with engine.begin() as conn:
            if dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            version = current_version(conn)
            before = version if before is None else before
            if version > LATEST:
                check(version)
            if version == LATEST:
                return before, version
            migration = steps[version + 1]
            if on_step is not None:
                on_step(migration)
            for statement in statements(migration.sql[dialect]):
                conn.exec_driver_sql(statement)
            conn.exec_driver_sql(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            conn.exec_driver_sql("DELETE FROM schema_version")
            conn.execute(sa.text("INSERT INTO schema_version (version) VALUES (:version)"),
                         {"version": migration.version})
