"""scripts/bench end to end on a tiny run: it works, not how fast (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IN_CI

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"


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
