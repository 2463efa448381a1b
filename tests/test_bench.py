"""scripts/bench end to end on a tiny run: it works, not how fast (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IN_CI, PG_URL, require_postgres

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"
sys.path.insert(0, str(BENCH.parent))
from bench import proxies  # noqa: E402


def require_bench_extra():
    try:
        import aiohttp  # noqa: F401
        import psutil  # noqa: F401
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"CI=true but the bench extra is not installed: {exc}")
        pytest.skip(f"the bench extra is not installed: {exc}")


@pytest.mark.slow
def test_fanout_reaches_every_viewer_and_records_the_ceiling(tmp_path):
    require_bench_extra()
    results = tmp_path / "fanout.json"
    command = [
        sys.executable, str(BENCH), "fanout", "--viewers", "5", "--trials", "1",
        "--ceiling-seconds", "0.5", "--no-ceiling-after", "--settle", "0.1", "--tail", "0.1",
        "--db-window", "0.5", "--timeout", "20", "--results-dir", str(tmp_path),
        "--json", str(results), "--", "--feed-window=500",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stdout + run.stderr

    document = json.loads(results.read_text())
    [trial] = document["trials"]
    assert trial["status"] == "ok", trial
    assert trial["held"] == 5
    assert trial["delivered"] == trial["expected"] == 5
    assert trial["p99_ms"] is not None and trial["cpu_s"] is not None
    ceiling = document["ceiling"]["before"]
    assert ceiling["requests"] > 0 and ceiling["rps"] > 0
    assert trial["v_ceiling_ms"] == pytest.approx(5 / ceiling["rps"] * 1000)
    assert document["settings"]["feed_window"] == 500  # flags after `--` reach the server
    assert document["git"]["revision"] and document["versions"]["aiohttp"]
    assert "V÷ceil ms" in run.stdout and "5/5" in run.stdout


def bench(tmp_path, name, *args, timeout=120):
    """Run ``scripts/bench NAME ARGS`` into tmp_path; its JSON document."""
    require_bench_extra()
    results = tmp_path / f"{name}.json"
    command = [sys.executable, str(BENCH), name, *args, "--results-dir", str(tmp_path),
               "--json", str(results)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(results.read_text())


def require_proxies():
    missing = [name for name in ("varnishd", "nginx") if not proxies.binary_path(name)]
    if not Path(proxies.NCHAN_MODULE).exists():
        missing.append("libnginx-mod-nchan")
    if missing:
        if IN_CI:
            pytest.fail(f"CI=true but {', '.join(missing)} missing")
        pytest.skip(f"missing: {', '.join(missing)}")


@pytest.mark.slow
@pytest.mark.postgres
def test_fanout_through_varnish_nginx_and_nchan_reaches_every_viewer(tmp_path):
    require_postgres()
    require_proxies()
    document = bench(tmp_path, "fanout", "--viewers", "5", "--trials", "1",
                     "--via", "direct,varnish,nginx,nchan,nchan-multipart", "--ceiling-seconds", "0.5",
                     "--no-ceiling-after", "--settle", "0.2", "--tail", "0.1",
                     "--db-window", "0.5", "--timeout", "20", "--database-url", PG_URL)
    rows = {row["via"]: row for row in document["trials"]}
    assert set(rows) == {"direct", "varnish", "nginx", "nchan", "nchan-multipart"}
    for via, row in rows.items():
        assert row["delivered"] == row["expected"] == 5, (via, row)
        assert row["status"] == "ok", (via, row)
    assert rows["varnish"]["held"] == rows["nginx"]["held"] == 1  # collapsed upstream


@pytest.mark.slow
@pytest.mark.postgres
def test_throughput_measures_the_ceiling_catch_up_and_posts_before_and_after(tmp_path):
    require_postgres()
    document = bench(tmp_path, "throughput", "--seconds", "0.5", "--connections", "5",
                     "--writers", "3", "--baseline-rev", "HEAD", "--database-url", PG_URL)
    rows = {row["what"]: row for row in document["rows"]}
    assert set(rows) == {"ceiling", "catch-up current", "POST current", "catch-up @HEAD",
                         "POST @HEAD"}
    assert rows["POST current"]["statuses"].get("201", 0) > 0
    assert rows["catch-up current"]["ok"] > 0 and rows["ceiling"]["rps"] > 0


@pytest.mark.slow
@pytest.mark.postgres
def test_dbload_counts_queries_for_the_service_and_the_seed(tmp_path):
    require_postgres()
    document = bench(tmp_path, "dbload", "--viewers", "3", "--window", "1", "--settle", "0.5",
                     "--database-url", PG_URL)
    rows = {row["design"]: row for row in document["rows"]}
    assert set(rows) == {"service", "seed"}
    assert rows["seed"]["answers_per_s"] > 0 and rows["service"]["feed_qps"] is not None


@pytest.mark.slow
def test_event_delivers_every_comment_exactly_once(tmp_path):
    document = bench(tmp_path, "event", "--viewers", "20", "--contents", "2", "--rate", "10",
                     "--duration", "1", "--tail", "1", "--settle", "0.2")
    [row] = document["rows"]
    assert row["posts"] == 10 and row["expected"] == 10 * 10
    assert row["missing"] == 0 and row["duplicates"] == 0
    assert row["p99_ms"] is not None and row["peak_rss_mb"] > 0



@pytest.mark.slow
def test_feeds_compares_one_connection_with_one_per_content(tmp_path):
    document = bench(tmp_path, "feeds", "--viewers", "10", "--contents", "6", "--follow", "3",
                     "--rate", "6", "--duration", "1", "--tail", "1", "--settle", "0.2")
    rows = {row["mode"]: row for row in document["rows"]}
    assert set(rows) == {"one", "each"}
    assert rows["one"]["connections"] == 10 and rows["each"]["connections"] == 30
    for mode, row in rows.items():
        assert row["posts"] == 6 and row["expected"] == row["delivered"] == 10 * 3, (mode, row)
        assert row["missing"] == 0 and row["duplicates"] == 0, (mode, row)
        assert row["p99_ms"] is not None and row["cpu_us_per_delivery"] is not None
        assert row["client_cpu_s"] is not None and row["requests_per_s"] > 0
    [ratio] = document["ratios"]
    assert ratio["V"] == 10 and ratio["connections"] == pytest.approx(1 / 3)


@pytest.mark.slow
def test_event_through_every_via_with_pacing_on_and_off(tmp_path):
    require_proxies()
    document = bench(tmp_path, "event", "--viewers", "6", "--contents", "2", "--rate", "10",
                     "--duration", "1", "--tail", "1", "--settle", "0.2",
                     "--via", "direct,varnish,nginx,nchan,nchan-multipart",
                     "--busy-pace-ms", "default,0", timeout=240)
    rows = {(row["via"], row["busy_pace_ms"]): row for row in document["rows"]}
    assert set(rows) == {("direct", 500), ("direct", 0), ("varnish", 500), ("varnish", 0),
                         ("nginx", 500), ("nginx", 0), ("nchan", None),
                         ("nchan-multipart", None)}
    for key, row in rows.items():
        assert row["posts"] == 10 and row["expected"] == 6 * 5, (key, row)
        assert row["missing"] == 0 and row["duplicates"] == 0, (key, row)
        assert row["front_rps"] > 0 and row["comments_per_answer"] > 0, (key, row)
        assert row["cpu_ms_per_1k"] is not None and row["peak_rss_mb"] > 0, (key, row)
        assert row["client_cpu_s"] is not None, (key, row)
        # The service's own count of its answers; none without a service.
        assert (row["service_rps"] is None) == key[0].startswith("nchan"), (key, row)
    logs = {path.name for path in tmp_path.iterdir()}
    assert any(name.endswith("varnish-V6-C2-proxy.varnishstat.json") for name in logs), logs
    assert any(name.endswith("nginx-V6-C2-proxy.error.log") for name in logs), logs


@pytest.mark.slow
def test_timeouts_answers_every_hold_after_its_wait(tmp_path):
    document = bench(tmp_path, "timeouts", "--holds", "20", "--wait", "1", "--spread", "0.2")
    [row] = document["rows"]
    assert row["answered"] == row["holds"] == 20 and row["errors"] == 0, row
    assert row["early"] == 0 and row["not_timeouts"] == 0, row
    assert row["answers_by_kind"].get("timeout") == 20, row
    assert row["p99_ms"] is not None


@pytest.mark.slow
def test_report_writes_the_page_and_its_plots(tmp_path):
    event = bench(tmp_path, "event", "--viewers", "5", "--contents", "1", "--rate", "5",
                  "--duration", "0.5", "--tail", "0.5", "--settle", "0.1")
    assert event["rows"]
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nWritten by hand, kept.\n")
    run = subprocess.run([sys.executable, str(BENCH), "report", "--results-dir", str(tmp_path),
                          "--page", str(page), "--img", str(tmp_path / "img")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    text = page.read_text()
    assert "Written by hand, kept." in text and "### Live event" in text
    assert (tmp_path / "img" / "event.png").read_bytes()[:4] == b"\x89PNG"
    subprocess.run([sys.executable, str(BENCH), "report", "--results-dir", str(tmp_path),
                    "--page", str(page), "--img", str(tmp_path / "img")], check=True,
                   capture_output=True, timeout=120)
    assert page.read_text() == text  # regenerated in place, not appended
