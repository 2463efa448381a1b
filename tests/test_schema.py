"""schema.sql (PostgreSQL) and the SQLAlchemy metadata (SQLite) describe one schema.

``init-db`` builds PostgreSQL from ``schema.sql``; SQLite gets its tables from
``service.db.store.metadata``. If someone adds a column or an index to only one
of them, one of the two databases silently runs another schema: these tests
reflect what each really creates and compare.
"""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from conftest import PG_URL, require_postgres, with_search_path
from sqlalchemy.dialects import postgresql

from service.db.store import Store, create_engine, metadata


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
    """A PostgreSQL schema made the way ``init-db`` makes it: from schema.sql."""
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
    """A SQLite database made the way the service makes it: from the metadata."""
    engine = create_engine(sqlite_url)
    Store(engine).create_schema()
    yield engine
    engine.dispose()


@pytest.mark.postgres
def test_schema_sql_creates_the_expected_tables(pg_from_schema_sql):
    """schema.sql makes the tables the service reads and writes."""
    assert sorted(sa.inspect(pg_from_schema_sql).get_table_names()) == [
        "author_limits",
        "comments",
        "content_seqs",
        "idempotency_keys",
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


def test_a_database_from_before_new_tables_is_completed(make_store, database_url):
    """A database made before a table was added is not taken as ready, and
    creating the schema again adds the table and keeps the comments."""
    store = make_store(database_url)
    first = store.add_comment(5, 1, "kept")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE idempotency_keys")
    assert not store.has_schema()
    store.create_schema()
    assert store.has_schema()
    assert store.get_comment(5, first.id) == first
