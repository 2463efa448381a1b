"""The migrations (schema.sql or SQLite's baseline, then service/db/migrations/)
and the SQLAlchemy metadata describe one schema, and upgrade a live database.

``init-db`` builds both databases from the migrations; the code reads and
writes by ``service.db.tables.metadata``. If someone adds a column or an
index to only one of them, a database silently runs another schema: these
tests reflect what each really creates and compare. The upgrade tests build
a database exactly as the release before versions did (tests/fixtures/
schema_v1.*.sql), fill it, upgrade it, and read everything back.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import PG_URL, require_postgres, with_search_path
from sqlalchemy.dialects import postgresql

from service.db import schema
from service.db.store import Store, create_engine
from service.db.tables import metadata


@pytest.fixture
def make_pg_engine():
    """``make_pg_engine()``: an engine on a fresh, empty PostgreSQL schema of its own."""
    require_postgres()
    admin = sa.create_engine(PG_URL)
    schemas, engines = [], []

    def make():
        schema = f"lc_schema_{uuid.uuid4().hex[:12]}"
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        schemas.append(schema)
        engine = create_engine(with_search_path(PG_URL, schema))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()
    with admin.begin() as conn:
        for schema in schemas:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


def _default(text):
    """Server defaults, with sequence names (schema-qualified or not) reduced to nextval."""
    if text is None:
        return None
    if text.startswith("nextval("):
        return "nextval"
    return text.lower()


def describe_pg(engine):
    """Everything PostgreSQL reports about the tables, in comparable form."""
    inspector = sa.inspect(engine)
    dialect = postgresql.dialect()
    tables = {}
    for table in sorted(inspector.get_table_names()):
        tables[table] = {
            "columns": {
                col["name"]: {
                    "type": col["type"].compile(dialect=dialect),
                    "nullable": col["nullable"],
                    "default": _default(col["default"]),
                }
                for col in inspector.get_columns(table)
            },
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "indexes": _indexes(inspector, table),
            "unique": sorted(
                (u["name"], tuple(u["column_names"]))
                for u in inspector.get_unique_constraints(table)
            ),
            "foreign_keys": sorted(
                (tuple(fk["constrained_columns"]), fk["referred_table"],
                 tuple(fk["referred_columns"]))
                for fk in inspector.get_foreign_keys(table)
            ),
            "checks": sorted(c["sqltext"] for c in inspector.get_check_constraints(table)),
        }
    return tables


def _indexes(inspector, table):
    return sorted(
        (ix["name"], tuple(ix["column_names"]), bool(ix["unique"]))
        for ix in inspector.get_indexes(table)
    )


def describe_portable(engine):
    """What any database must agree on: tables, columns (by Python type), nulls, keys, indexes."""
    inspector = sa.inspect(engine)
    tables = {}
    for table in sorted(inspector.get_table_names()):
        tables[table] = {
            "columns": {
                col["name"]: (col["type"].python_type, col["nullable"])
                for col in inspector.get_columns(table)
            },
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "indexes": _indexes(inspector, table),
        }
    return tables


@pytest.fixture
def pg_from_schema_sql(make_pg_engine):
    """A PostgreSQL schema made the way ``init-db`` makes it: from schema.sql
    and the migrations."""
    engine = make_pg_engine()
    Store(engine).create_schema()
    return engine


@pytest.fixture
def pg_from_metadata(make_pg_engine):
    engine = make_pg_engine()
    metadata.create_all(engine)
    return engine


@pytest.fixture
def sqlite_from_metadata(sqlite_url):
    """A SQLite database made the way the service makes it: from the migrations."""
    engine = create_engine(sqlite_url)
    Store(engine).create_schema()
    yield engine
    engine.dispose()


@pytest.mark.postgres
def test_schema_sql_creates_the_expected_tables(pg_from_schema_sql):
    """schema.sql makes the tables the service reads and writes."""
    assert sorted(sa.inspect(pg_from_schema_sql).get_table_names()) == [
        "author_limits",
        "bans",
        "comments",
        "content_events",
        "content_seqs",
        "idempotency_keys",
        "rooms",
        "schema_version",
    ]


@pytest.mark.postgres
def test_schema_sql_matches_metadata_on_postgresql(pg_from_schema_sql, pg_from_metadata):
    """Types, nullability, defaults, keys and indexes are the same either way."""
    from_sql = describe_pg(pg_from_schema_sql)
    from_metadata = describe_pg(pg_from_metadata)
    assert from_sql.keys() == from_metadata.keys()
    for table in from_sql:
        assert from_sql[table] == from_metadata[table], table


@pytest.mark.postgres
def test_sqlite_metadata_matches_schema_sql(pg_from_schema_sql, sqlite_from_metadata):
    """A SQLite deployment has the same columns, nulls, keys and indexes as PostgreSQL."""
    postgres = describe_portable(pg_from_schema_sql)
    sqlite = describe_portable(sqlite_from_metadata)
    assert postgres.keys() == sqlite.keys()
    for table in postgres:
        assert postgres[table] == sqlite[table], table


@pytest.mark.postgres
def test_the_feed_index_is_unique_on_content_and_seq(pg_from_schema_sql, sqlite_from_metadata):
    """Two comments can never share a seq in one content, on either database."""
    for engine in (pg_from_schema_sql, sqlite_from_metadata):
        indexes = _indexes(sa.inspect(engine), "comments")
        assert ("comments_content_seq", ("content_id", "seq"), True) in indexes


@pytest.mark.postgres
def test_comment_ids_are_generated_on_both_databases(pg_from_schema_sql, sqlite_from_metadata):
    """Inserting without an id gets one, and deleted defaults to false."""
    for engine in (pg_from_schema_sql, sqlite_from_metadata):
        store = Store(engine)
        first = store.add_comment(1, 1, "a")
        second = store.add_comment(1, 1, "b")
        assert second.id > first.id > 0
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO comments (content_id, author_id, body, created_at, seq) "
                    "VALUES (2, 1, 'x', CURRENT_TIMESTAMP, 1)"
                )
            )
            deleted = conn.execute(
                sa.text("SELECT deleted FROM comments WHERE content_id = 2")
            ).scalar_one()
        assert deleted in (False, 0)


def test_init_db_is_idempotent(make_store, database_url):
    """Running init-db again on a live database keeps the comments and the seqs."""
    store = make_store(database_url)
    store.create_schema()
    first = store.add_comment(5, 1, "kept")
    store.create_schema()
    store.create_schema()
    assert store.has_schema()
    assert store.get_comment(5, first.id) == first
    assert store.add_comment(5, 1, "next").seq == 2


# -- upgrading a database made before versions ---------------------------------

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def build_version_1(engine):
    """The schema exactly as the release before versions made it: schema.sql
    on PostgreSQL, the metadata's DDL on SQLite (copies kept as fixtures)."""
    dialect = engine.dialect.name
    sql = (FIXTURES / f"schema_v1.{dialect}.sql").read_text()
    with engine.begin() as conn:
        for statement in schema.statements(sql):
            conn.exec_driver_sql(statement)


def fill_version_1(engine):
    """Comments over several contents as version 1's store wrote them
    (its columns only), deletions and keys included; what was written."""
    rows, seqs = [], {}
    created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    with engine.begin() as conn:
        for n in range(60):
            content = 10 + n % 4
            seqs[content] = seqs.get(content, 0) + 1
            row = {"content_id": content, "author_id": 100 + n % 7,
                   "body": f"comment {n} ünïcödé ✓\n" * (1 + n % 3),
                   "created_at": created + timedelta(seconds=n), "seq": seqs[content],
                   "deleted": False}
            row["id"] = conn.execute(
                sa.text("INSERT INTO comments (content_id, author_id, body, created_at, seq, "
                        "deleted) VALUES (:content_id, :author_id, :body, :created_at, :seq, "
                        ":deleted) RETURNING id"), row).scalar_one()
            rows.append(row)
        for row in rows[::9]:  # some become tombstones at a later seq
            seqs[row["content_id"]] += 1
            row.update(body=None, deleted=True, seq=seqs[row["content_id"]])
            conn.execute(sa.text("UPDATE comments SET body = NULL, deleted = :deleted, seq = :seq "
                                 "WHERE id = :id"), row)
        for content, last in seqs.items():
            conn.execute(sa.text("INSERT INTO content_seqs VALUES (:c, :s)"),
                         {"c": content, "s": last})
        conn.execute(sa.text("INSERT INTO author_limits VALUES (100, 123456789)"))
    return rows, seqs


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_engine(request, make_pg_engine, sqlite_url):
    if request.param == "postgresql":
        yield make_pg_engine()
        return
    engine = create_engine(sqlite_url)
    yield engine
    engine.dispose()


def test_fresh_databases_are_at_the_latest_version(empty_engine):
    store = Store(empty_engine)
    assert store.schema_version() == 0
    assert store.create_schema() == (0, schema.LATEST)
    assert store.schema_version() == schema.LATEST == 3
    assert store.create_schema() == (schema.LATEST, schema.LATEST)
    with empty_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM schema_version").scalar() == 1


def test_a_version_1_database_upgrades_keeping_every_comment_and_cursor(empty_engine):
    """A database made and filled by the release before versions upgrades
    in place: every comment, tombstone and cursor reads back the same, and
    replies work on it afterwards."""
    build_version_1(empty_engine)
    rows, seqs = fill_version_1(empty_engine)
    store = Store(empty_engine)
    assert store.schema_version() == 0  # unversioned: counted as before version 1
    assert not store.has_schema()
    with pytest.raises(schema.SchemaTooOld, match="livecomments init-db"):
        store.check_schema()
    steps = []
    assert store.create_schema(on_step=steps.append) == (0, schema.LATEST)
    assert [m.version for m in steps] == [1, 2, 3]
    assert store.has_schema()
    store.check_schema()

    for row in rows:
        comment = store.get_comment(row["content_id"], row["id"])
        assert (comment.author_id, comment.body, comment.seq, comment.deleted) == (
            row["author_id"], row["body"], row["seq"], row["deleted"])
        assert comment.created_at == row["created_at"]
        assert comment.parent_id is None and comment.to_json()["parent"] is None
    for content, last in seqs.items():
        assert store.current_seq(content) == last
        changes = store.changes_since(content, 0, 1000)
        assert [c.id for c in changes] == [
            r["id"] for r in sorted(rows, key=lambda r: r["seq"]) if r["content_id"] == content]
        page, cursor = store.latest(content, 1000)
        assert cursor == last and all(not c.deleted for c in page)

    # Writes go on from the cursors; replies work on the upgraded database.
    parent = next(r for r in rows if not r["deleted"])
    reply = store.post_comment(parent["content_id"], 1, "a reply",
                               parent_id=parent["id"]).comment
    assert reply.seq == seqs[parent["content_id"]] + 1
    assert reply.to_json()["parent"] == {
        "id": parent["id"], "author_id": parent["author_id"],
        "excerpt": parent["body"][:80], "deleted": False}
    assert store.get_comment(parent["content_id"], reply.id) == reply
    assert store.add_comment(10, 1, "plain").seq == seqs[10] + (parent["content_id"] == 10) + 1

    # Moderation (version 3) works on it too: a ban retracting an author's
    # comments, and a room, each at the content's next seqs.
    author_rows = [r for r in rows if r["content_id"] == 11 and r["author_id"] == 101]
    live = [r["id"] for r in author_rows if not r["deleted"]]
    before = store.current_seq(11)
    made = store.ban(11, 101, retract=True, moderator_id=99)
    assert made.retracted == len(live) > 0
    assert made.seq == before + len(live) + 1
    assert all(store.get_comment(11, i).deleted for i in live)
    room, event = store.set_room(11, 99, closed=True)
    assert room.closed and event.seq == made.seq + 1
    assert [c.seq for c in store.changes_since(11, before, 100)] == list(
        range(before + 1, event.seq + 1))


def test_a_half_upgraded_database_resumes(empty_engine):
    """Stopped after version 1 (each version commits on its own), the next
    run applies only what is left."""
    build_version_1(empty_engine)
    fill_version_1(empty_engine)
    real = schema.migrations

    def up_to_1():
        return {1: real()[1]}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(schema, "migrations", up_to_1)
        patch.setattr(schema, "LATEST", 1)
        assert Store(empty_engine).create_schema() == (0, 1)
    steps = []
    assert Store(empty_engine).create_schema(on_step=steps.append) == (1, 3)
    assert [m.version for m in steps] == [2, 3]


def test_a_newer_database_is_refused(empty_engine):
    store = Store(empty_engine)
    store.create_schema()
    with empty_engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE schema_version SET version = {schema.LATEST + 1}")
    with pytest.raises(schema.SchemaTooNew, match="newer than this code"):
        store.create_schema()
    with pytest.raises(schema.SchemaTooNew):
        store.check_schema()
    assert store.schema_version() == schema.LATEST + 1  # left as it was


def test_every_migration_has_both_dialects_and_is_numbered():
    found = schema.migrations()
    assert sorted(found) == list(range(1, schema.LATEST + 1))
    for migration in found.values():
        assert set(migration.sql) == {"postgresql", "sqlite"}
        assert schema.statements(migration.sql["postgresql"])


def test_a_database_from_before_new_tables_is_completed(empty_engine):
    """An unversioned database made before a table of version 1 was added
    (idempotency keys) gets the table from the baseline, keeps its
    comments, and is upgraded."""
    build_version_1(empty_engine)
    rows, _ = fill_version_1(empty_engine)
    with empty_engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE idempotency_keys")
    store = Store(empty_engine)
    assert not store.has_schema()
    store.create_schema()
    assert store.has_schema()
    assert sa.inspect(empty_engine).has_table("idempotency_keys")
    assert store.get_comment(rows[1]["content_id"], rows[1]["id"]).body == rows[1]["body"]
