"""The ``livecomments`` command: mint-token, init-db, and serve refusing bad setups."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import service.db.schema
from service.cli import main
from service.config.secret import DEV_SECRET_FILE
from service.web.auth import InvalidToken, Principal, TokenSigner

SECRET = "cli-secret-0123456789abcdef"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No LIVECOMMENTS_* from the caller's shell, and an empty working directory."""
    for name in list(os.environ):
        if name.startswith("LIVECOMMENTS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def run_cli(tmp_path, *args, env=None, timeout=30):
    """Run ``python -m service ARGS`` in ``tmp_path`` with only ``env``'s settings."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOMMENTS_")}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_mint_token_with_secret(tmp_path):
    """An operator mints a moderator token the service will accept."""
    result = run_cli(
        tmp_path, "mint-token", "--author-id", "7", "--role", "moderator",
        env={"LIVECOMMENTS_SECRET": SECRET},
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert TokenSigner(SECRET).verify(token) == Principal(7, "moderator")


def test_mint_token_ttl(clean_env, capsys):
    """--ttl sets how long the token is valid."""
    clean_env.setenv("LIVECOMMENTS_SECRET", SECRET)
    before = time.time()
    assert main(["mint-token", "--author-id", "3", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenSigner(SECRET, clock=lambda: before + 58).verify(token) == Principal(3, "user")
    with pytest.raises(InvalidToken, match="expired"):
        TokenSigner(SECRET, clock=lambda: time.time() + 61).verify(token)


def test_mint_token_uses_the_dev_secret_file(clean_env, tmp_path, capsys):
    """In a directory where the dev server runs, mint-token signs with its secret."""
    dev_secret = "dev-secret-from-file-0123456789"
    (tmp_path / DEV_SECRET_FILE).write_text(dev_secret + "\n")
    assert main(["mint-token", "--author-id", "4"]) == 0
    out, err = capsys.readouterr()
    assert TokenSigner(dev_secret).verify(out.strip()) == Principal(4, "user")
    assert DEV_SECRET_FILE in err


def test_mint_token_in_dev_mode_creates_the_secret_the_server_will_use(clean_env, tmp_path, capsys):
    """With LIVECOMMENTS_DEV=1 and no file yet, the dev secret is made and reused."""
    clean_env.setenv("LIVECOMMENTS_DEV", "1")
    assert main(["mint-token", "--author-id", "5"]) == 0
    first = capsys.readouterr().out.strip()
    dev_secret = (tmp_path / DEV_SECRET_FILE).read_text().strip()
    assert TokenSigner(dev_secret).verify(first).author_id == 5
    assert main(["mint-token", "--author-id", "6"]) == 0
    assert TokenSigner(dev_secret).verify(capsys.readouterr().out.strip()).author_id == 6


def test_mint_token_without_any_secret_fails(tmp_path):
    """No secret, no dev file, no dev mode: a non-zero exit that says what is missing."""
    result = run_cli(tmp_path, "mint-token", "--author-id", "1")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "LIVECOMMENTS_SECRET" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / DEV_SECRET_FILE).exists()


@pytest.mark.parametrize("author_id", ["0", "-5"])
def test_mint_token_refuses_bad_author(clean_env, capsys, author_id):
    clean_env.setenv("LIVECOMMENTS_SECRET", SECRET)
    assert main(["mint-token", "--author-id", author_id]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "author_id" in err


def test_mint_token_refuses_unknown_role(clean_env, capsys):
    clean_env.setenv("LIVECOMMENTS_SECRET", SECRET)
    with pytest.raises(SystemExit) as excinfo:
        main(["mint-token", "--author-id", "1", "--role", "admin"])
    assert excinfo.value.code == 2
    assert "role" in capsys.readouterr().err


def test_init_db_on_sqlite(clean_env, tmp_path, capsys):
    """init-db makes the tables in the named SQLite file."""
    path = tmp_path / "fresh.db"
    assert main(["init-db", "--database-url", f"sqlite:///{path}"]) == 0
    assert "sqlite" in capsys.readouterr().out
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        assert {"comments", "content_seqs"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    # Again on the same file: still fine.
    assert main(["init-db", "--database-url", f"sqlite:///{path}"]) == 0


def test_init_db_uses_the_environment_url(tmp_path):
    """LIVECOMMENTS_DATABASE_URL is honoured by init-db too."""
    path = tmp_path / "env.db"
    result = run_cli(tmp_path, "init-db", env={"LIVECOMMENTS_DATABASE_URL": f"sqlite:///{path}"})
    assert result.returncode == 0, result.stderr
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        assert sa.inspect(engine).has_table("comments")
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_init_db_on_postgresql(pg_url, tmp_path):
    """init-db on PostgreSQL creates the tables, and running it twice is fine."""
    for _ in range(2):
        result = run_cli(tmp_path, "init-db", "--database-url", pg_url)
        assert result.returncode == 0, result.stderr
        assert "postgresql" in result.stdout
    engine = sa.create_engine(pg_url)
    try:
        assert {"comments", "content_seqs"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_init_db_on_postgresql_runs_schema_sql(pg_url, clean_env, tmp_path, capsys):
    """On PostgreSQL the tables come from schema.sql, not from the metadata."""
    marked = tmp_path / "schema.sql"
    real = service.db.schema.data_file
    marked.write_text(
        real("schema.sql").read_text()
        + "\nCREATE TABLE IF NOT EXISTS schema_sql_was_here (x int);\n"
    )
    clean_env.setattr(service.db.schema, "data_file",
                      lambda name: marked if name == "schema.sql" else real(name))
    assert main(["init-db", "--database-url", pg_url]) == 0
    engine = sa.create_engine(pg_url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"comments", "content_seqs", "schema_sql_was_here"} <= tables


def _set_version(url, version):
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE schema_version SET version = {version}")
    finally:
        engine.dispose()


def test_init_db_upgrades_and_refuses_a_newer_database(clean_env, tmp_path, capsys):
    """init-db says which versions it applies; a database at a version
    newer than the code's is refused with a message and exit status 1,
    and so is serving it."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["init-db", "--database-url", url]) == 0
    out = capsys.readouterr().out
    assert "applying schema version 1 (baseline)" in out
    assert "applying schema version 2 (replies)" in out
    assert f"version {service.db.schema.LATEST}" in out
    _set_version(url, service.db.schema.LATEST + 1)
    assert main(["init-db", "--database-url", url]) == 1
    assert "newer than this code" in capsys.readouterr().err
    clean_env.setenv("LIVECOMMENTS_SECRET", SECRET)
    assert main(["serve", "--database-url", url]) == 2
    assert "newer than this code" in capsys.readouterr().err


@pytest.mark.postgres
def test_serve_refuses_an_older_postgresql_database(pg_url, clean_env, capsys):
    """An app over PostgreSQL never upgrades it: an older database is
    refused until `livecomments init-db` has run."""
    from service.app import create_app
    from service.config.settings import Settings

    assert main(["init-db", "--database-url", pg_url]) == 0
    _set_version(pg_url, 1)
    clean_env.setenv("LIVECOMMENTS_SECRET", SECRET)
    assert main(["serve", "--database-url", pg_url]) == 2
    assert "run `livecomments init-db`" in capsys.readouterr().err
    settings = Settings.from_env(environ={}, database_url=pg_url, secret=SECRET)
    with pytest.raises(service.db.schema.SchemaTooOld, match="livecomments init-db"):
        create_app(settings)


@pytest.mark.parametrize(
    ("args", "env", "name"),
    [
        (["--port", "abc"], {}, "port"),
        (["--port", "0"], {}, "port"),
        ([], {"LIVECOMMENTS_THREADS": "0"}, "threads"),
        (["--threads", "10", "--hold-budget", "10"], {}, "hold_budget"),
        ([], {"LIVECOMMENTS_POST_RATE": "five"}, "post_rate"),
        (["--database-url", "mysql://x/y"], {}, "database_url"),
        (["--max-wait", "500", "--channel-timeout", "120"], {}, "channel_timeout"),
    ],
)
def test_serve_refuses_bad_settings(clean_env, capsys, args, env, name):
    """serve with a bad setting exits 2 naming it, before anything starts."""
    clean_env.setenv("LIVECOMMENTS_SECRET", SECRET)
    for key, value in env.items():
        clean_env.setenv(key, value)
    assert main(["serve", *args]) == 2
    out, err = capsys.readouterr()
    assert name in err
    assert err.startswith("livecomments: ")


def test_serve_bad_setting_exit_code_from_the_command_line(tmp_path):
    """The real command exits 2 with one readable line, no traceback."""
    result = run_cli(tmp_path, "serve", "--port", "abc", env={"LIVECOMMENTS_SECRET": SECRET})
    assert result.returncode == 2
    assert "port" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_without_secret_refuses_quickly(tmp_path):
    """Without a secret and without dev mode the server does not start, and says why."""
    port = _free_port()
    result = run_cli(
        tmp_path, "serve", "--port", str(port), "--database-url", f"sqlite:///{tmp_path}/x.db",
        timeout=30,
    )
    assert result.returncode != 0
    assert "LIVECOMMENTS_SECRET" in result.stderr
    assert "LIVECOMMENTS_DEV" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / DEV_SECRET_FILE).exists()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_refuses_a_database_that_is_not_there_in_one_line(tmp_path):
    with socket.socket() as probe:  # a port nobody serves
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli(tmp_path, "serve", "--port", str(port), env={
        "LIVECOMMENTS_SECRET": SECRET,
        "LIVECOMMENTS_DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:1/nothing"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = [text for text in result.stderr.splitlines() if text.strip()]
    assert line.startswith("livecomments: cannot reach the database:")
