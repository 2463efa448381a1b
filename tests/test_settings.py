"""Settings: defaults, LIVECOMMENTS_* parsing, overrides, refusal of bad values."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from service.cli import settings_table
from service.config.secret import DEV_SECRET_FILE
from service.config.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parent.parent

GOOD_SECRET = "s3cret-0123456789abcdef"


def test_defaults_hold_a_thousand_viewers():
    """Out of the box the server holds >= 1,000 long-polls and keeps threads free for writes."""
    settings = Settings.from_env(environ={})
    assert settings.hold_budget >= 1000
    assert settings.hold_budget < settings.threads
    assert settings.channel_timeout > settings.max_wait
    assert settings.default_wait <= settings.max_wait


@pytest.mark.parametrize("threads", [2, 11, 64, 500, 5000])
def test_hold_budget_follows_the_thread_count(threads):
    """Setting only the threads gives a budget that holds most of them and
    keeps at least one (one in eleven) free for writes."""
    settings = Settings.from_env(environ={"LIVECOMMENTS_THREADS": str(threads)})
    assert 1 <= settings.hold_budget < threads
    assert threads - settings.hold_budget >= threads // 11
    assert settings.hold_budget >= threads * 0.9 - 1


def test_waits_and_timeouts_follow_max_wait():
    """A longer or shorter max_wait alone is a working configuration."""
    long = Settings.from_env(environ={"LIVECOMMENTS_MAX_WAIT": "500"})
    assert long.channel_timeout > 500 and long.feed_ttl > 500 and long.default_wait == 20
    short = Settings.from_env(environ={"LIVECOMMENTS_MAX_WAIT": "5"})
    assert short.default_wait == 5
    assert (short.channel_timeout, short.feed_ttl) == (120, 60)


def test_explicit_values_win_over_derived_ones():
    settings = Settings.from_env(environ={}, threads=64, hold_budget=10, default_wait=3,
                                 channel_timeout=45, feed_ttl=40)
    assert (settings.hold_budget, settings.default_wait) == (10, 3)
    assert (settings.channel_timeout, settings.feed_ttl) == (45, 40)


def test_defaults_match_the_contract():
    """The documented defaults: 127.0.0.1:8080, 0.5 s polls, 30 s holds, 5/10 posting, no dev."""
    settings = Settings.from_env(environ={})
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.poll_interval == 0.5
    assert settings.max_wait == 30
    assert settings.post_rate == (5, 10.0)
    assert settings.dev is False
    assert settings.secret is None
    assert settings.database_url.startswith("sqlite:///")
    assert settings.is_sqlite


def test_environment_is_parsed():
    """LIVECOMMENTS_* variables reach the settings with their proper types."""
    settings = Settings.from_env(
        environ={
            "LIVECOMMENTS_PORT": "9001",
            "LIVECOMMENTS_HOST": "0.0.0.0",
            "LIVECOMMENTS_POST_RATE": "5/10",
            "LIVECOMMENTS_DEV": "1",
            "LIVECOMMENTS_POLL_INTERVAL": "0.25",
            "LIVECOMMENTS_MAX_WAIT": "25",
            "LIVECOMMENTS_SECRET": GOOD_SECRET,
            "LIVECOMMENTS_DATABASE_URL": "postgresql+psycopg2://u@h:5432/db",
        }
    )
    assert settings.port == 9001
    assert settings.host == "0.0.0.0"
    assert settings.post_rate == (5, 10.0)
    assert settings.dev is True
    assert settings.poll_interval == 0.25
    assert settings.max_wait == 25
    assert settings.secret == GOOD_SECRET
    assert settings.database_url == "postgresql+psycopg2://u@h:5432/db"
    assert not settings.is_sqlite


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5/10", (5, 10.0)), ("1/0.5", (1, 0.5)), (" 20 / 60 ", (20, 60.0)), ("0", None)],
)
def test_post_rate_forms(text, expected):
    """LIVECOMMENTS_POST_RATE takes N/S, and 0 turns the limit off."""
    settings = Settings.from_env(environ={"LIVECOMMENTS_POST_RATE": text})
    assert settings.post_rate == expected


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("0", False), ("true", True)])
def test_dev_flag_forms(text, expected):
    """LIVECOMMENTS_DEV=1 turns development mode on, 0 leaves it off."""
    assert Settings.from_env(environ={"LIVECOMMENTS_DEV": text}).dev is expected


def test_empty_variable_means_default():
    """An exported but empty variable does not break startup; the default applies."""
    settings = Settings.from_env(environ={"LIVECOMMENTS_PORT": ""})
    assert settings.port == 8080


def test_connection_limits():
    """A client address may hold a quarter of the connections unless told
    otherwise; no proxy is trusted until listed."""
    settings = Settings.from_env(environ={})
    assert settings.header_timeout == 30
    assert settings.max_header_bytes == 32 * 1024
    assert settings.max_connections_per_address == 1000
    assert settings.trusted_proxies == ()
    derived = Settings.from_env(environ={"LIVECOMMENTS_CONNECTION_LIMIT": "200"})
    assert derived.max_connections_per_address == 50
    settings = Settings.from_env(environ={
        "LIVECOMMENTS_MAX_CONNECTIONS_PER_ADDRESS": "10",
        "LIVECOMMENTS_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8,::1",
        "LIVECOMMENTS_HEADER_TIMEOUT": "2.5",
    })
    assert settings.max_connections_per_address == 10
    assert settings.trusted_proxies == ("127.0.0.1/32", "10.0.0.0/8", "::1/128")
    assert settings.header_timeout == 2.5


def test_overrides_win_over_environment():
    """A serve flag beats the environment variable, as text or typed."""
    environ = {"LIVECOMMENTS_PORT": "9001", "LIVECOMMENTS_POST_RATE": "5/10"}
    settings = Settings.from_env(environ=environ, port="9100", post_rate="0")
    assert settings.port == 9100
    assert settings.post_rate is None
    assert Settings.from_env(environ=environ, port=9200).port == 9200


def test_none_overrides_are_ignored():
    """Flags not given (None) leave the environment's value in place."""
    settings = Settings.from_env(
        environ={"LIVECOMMENTS_PORT": "9001"}, port=None, host=None, secret=None
    )
    assert settings.port == 9001
    assert settings.host == "127.0.0.1"
    assert settings.secret is None


def test_unknown_override_refused():
    """A misspelt setting is an error, not silently dropped."""
    with pytest.raises(SettingsError, match="prot"):
        Settings.from_env(environ={}, prot=9000)


@pytest.mark.parametrize(
    ("environ", "overrides", "names"),
    [
        ({"LIVECOMMENTS_PORT": "abc"}, {}, ["port", "LIVECOMMENTS_PORT", "abc"]),
        ({"LIVECOMMENTS_PORT": "0"}, {}, ["port"]),
        ({"LIVECOMMENTS_PORT": "70000"}, {}, ["port"]),
        ({}, {"port": "abc"}, ["port"]),
        ({}, {"port": 0}, ["port"]),
        ({"LIVECOMMENTS_POST_RATE": "five"}, {}, ["post_rate", "LIVECOMMENTS_POST_RATE"]),
        ({"LIVECOMMENTS_POST_RATE": "0/10"}, {}, ["post_rate"]),
        ({"LIVECOMMENTS_POST_RATE": "5/0"}, {}, ["post_rate"]),
        ({"LIVECOMMENTS_DEV": "maybe"}, {}, ["dev", "LIVECOMMENTS_DEV"]),
        ({"LIVECOMMENTS_THREADS": "0"}, {}, ["threads"]),
        ({"LIVECOMMENTS_POLL_INTERVAL": "fast"}, {}, ["poll_interval"]),
        ({"LIVECOMMENTS_POLL_INTERVAL": "0"}, {}, ["poll_interval"]),
        ({}, {"threads": 500, "hold_budget": 1000}, ["hold_budget", "threads"]),
        ({}, {"threads": 100, "hold_budget": 100}, ["hold_budget", "threads"]),
        ({"LIVECOMMENTS_THREADS": "1"}, {}, ["threads"]),
        ({}, {"feed_ttl": 20}, ["feed_ttl", "max_wait"]),
        ({}, {"channel_timeout": 30}, ["channel_timeout", "max_wait"]),
        ({}, {"max_wait": 10, "default_wait": 11}, ["default_wait", "max_wait"]),
        ({}, {"default_wait": -1}, ["default_wait"]),
        ({}, {"database_url": "mysql://u@h/db"}, ["database_url"]),
        ({}, {"database_url": "livecomments.db"}, ["database_url"]),
        ({"LIVECOMMENTS_SECRET": "short"}, {}, ["secret"]),
        ({"LIVECOMMENTS_HEADER_TIMEOUT": "0"}, {}, ["header_timeout"]),
        ({"LIVECOMMENTS_HEADER_TIMEOUT": "nan"}, {}, ["header_timeout"]),
        ({"LIVECOMMENTS_MAX_HEADER_BYTES": "0"}, {}, ["max_header_bytes"]),
        ({"LIVECOMMENTS_MAX_CONNECTIONS_PER_ADDRESS": "0"}, {}, ["max_connections_per_address"]),
        ({"LIVECOMMENTS_TRUSTED_PROXIES": "proxy.local"}, {},
         ["trusted_proxies", "LIVECOMMENTS_TRUSTED_PROXIES"]),
    ],
)
def test_bad_values_refused_naming_the_setting(environ, overrides, names):
    """A bad value stops startup with a message that says which setting is wrong."""
    with pytest.raises(SettingsError) as excinfo:
        Settings.from_env(environ=environ, **overrides)
    message = str(excinfo.value)
    for name in names:
        assert name in message


def test_metrics_dir_must_exist_with_workers(tmp_path):
    """The workers' metrics directory is refused at start, not by a worker."""
    url = f"sqlite:///{tmp_path}/db"
    settings = Settings.from_env(environ={"LIVECOMMENTS_METRICS_DIR": str(tmp_path)},
                                 workers=2, database_url=url)
    assert settings.metrics_dir == str(tmp_path)
    assert Settings.from_env(environ={}).metrics_dir is None
    with pytest.raises(SettingsError, match="metrics_dir"):
        Settings.from_env(environ={}, workers=2, database_url=url,
                          metrics_dir=str(tmp_path / "missing"))


def test_settings_are_frozen():
    """Nothing can change the settings behind the server's back."""
    settings = Settings.from_env(environ={})
    with pytest.raises(AttributeError):
        settings.port = 1


def test_resolve_secret_returns_the_configured_secret(tmp_path):
    """With a secret set, that secret signs tokens and no file is written."""
    settings = Settings.from_env(environ={"LIVECOMMENTS_SECRET": GOOD_SECRET})
    assert settings.resolve_secret(tmp_path) == GOOD_SECRET
    assert not (tmp_path / DEV_SECRET_FILE).exists()


def test_resolve_secret_refuses_without_secret_or_dev(tmp_path):
    """Without a secret and without dev mode the service refuses, saying what to set."""
    settings = Settings.from_env(environ={})
    with pytest.raises(SettingsError, match="LIVECOMMENTS_SECRET"):
        settings.resolve_secret(tmp_path)
    assert not (tmp_path / DEV_SECRET_FILE).exists()


def test_dev_secret_is_generated_private_and_stable(tmp_path):
    """Dev mode writes one private (0600) secret file and reuses it."""
    settings = Settings.from_env(environ={"LIVECOMMENTS_DEV": "1"})
    first = settings.resolve_secret(tmp_path)
    path = tmp_path / DEV_SECRET_FILE
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) >= 16
    assert path.read_text().strip() == first
    assert settings.resolve_secret(tmp_path) == first
    # A second process (mint-token, a restart) gets the same secret too.
    again = Settings.from_env(environ={"LIVECOMMENTS_DEV": "1"})
    assert again.resolve_secret(tmp_path) == first


def test_dev_secret_is_never_readable_by_others(tmp_path, monkeypatch):
    """The secret file is created private, not made private after it was written."""
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)
    settings = Settings.from_env(environ={"LIVECOMMENTS_DEV": "1"})
    settings.resolve_secret(tmp_path)
    mode = stat.S_IMODE((tmp_path / DEV_SECRET_FILE).stat().st_mode)
    assert mode & 0o077 == 0


def test_configuration_page_lists_every_setting_as_declared():
    """docs/configuration.md's table is the settings module's own; regenerate it with
    ``.venv/bin/python -c "from service.cli import settings_table as t; print(t())"``."""
    page = (REPO / "docs" / "configuration.md").read_text()
    start = page.index("<!-- settings-table")
    start = page.index("\n", start) + 1
    end = page.index("<!-- end settings-table -->")
    assert page[start:end].strip() == settings_table().strip()


def test_configuration_page_names_every_fixed_constant():
    """Every module-level constant of the service is named in docs/configuration.md
    with its reason."""
    page = (REPO / "docs" / "configuration.md").read_text()
    constants = {
        name
        for path in (REPO / "service").rglob("*.py")
        for name in re.findall(r"^([A-Z][A-Z0-9_]+)\s*=", path.read_text(), re.MULTILINE)
    }
    assert constants, "found no constants: the pattern is wrong"
    missing = sorted(name for name in constants if f"`{name}`" not in page)
    assert not missing, f"docs/configuration.md does not list: {missing}"
