"""``/metrics`` and the staleness ``/healthz`` reports: what they count, per app."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import webtest
from conftest import make_settings
from prometheus_client.parser import text_string_to_metric_families
from test_hold import waiting

from service.live.hub import FeedHub

REPO = Path(__file__).resolve().parent.parent


def scrape(client):
    """{(name, labels as a sorted tuple): value} of every sample."""
    resp = client.get("/metrics")
    assert resp.headers["Cache-Control"] == "no-store"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def test_a_woken_viewer_is_a_delivery_with_its_latency(client, token):
    cursor = client.get("/contents/1/comments").json["cursor"]
    answers = []
    viewer = threading.Thread(target=lambda: answers.append(
        client.get(f"/contents/1/comments?since={cursor}&wait=5")))
    viewer.start()
    deadline = time.monotonic() + 5
    # Held: its slot taken and waiting in its feed, so the post wakes it.
    while client.get("/healthz").json["held"] < 1 or not waiting(client.app.hub):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.post_json("/contents/1/comments", {"body": "hi"}, headers={"Authorization": token()})
    viewer.join(10)
    assert answers[0].json["comments"]
    samples = scrape(client)  # a scrape drains the samples first
    assert samples["livecomments_deliveries_total", ()] == 1
    assert samples["livecomments_delivery_latency_seconds_count", ()] == 1
    assert 0 <= samples["livecomments_delivery_latency_seconds_sum", ()] < 5
    assert samples["livecomments_feed_answers_total", (("kind", "woken"),)] == 1
    assert samples["livecomments_feed_answers_total", (("kind", "latest"),)] == 1
    assert samples["livecomments_feeds", ()] == 1
    assert samples["livecomments_feed_query_seconds_count", ()] >= 1


def test_writes_are_counted_by_status_and_reads_are_not(make_app, token):
    client = webtest.TestApp(make_app(post_rate="1/60"))
    headers = {"Authorization": token()}
    client.post_json("/contents/1/comments", {"body": "one"}, headers=headers)
    client.post_json("/contents/1/comments", {"body": "two"}, headers=headers, status=429)
    client.delete("/contents/1/comments/999", headers=headers, status=404)
    client.get("/contents/1/comments?since=0&wait=0")
    samples = scrape(client)
    writes = {labels: value for (name, labels), value in samples.items()
              if name == "livecomments_writes_total"}
    assert writes == {(("method", "POST"), ("status", "201")): 1,
                      (("method", "POST"), ("status", "429")): 1,
                      (("method", "DELETE"), ("status", "404")): 1}
    assert samples["livecomments_rate_limited_total", ()] == 1
    assert samples["livecomments_write_seconds_count", (("method", "POST"),)] == 2


def test_every_app_has_a_registry_of_its_own(make_app, token):
    first, second = webtest.TestApp(make_app()), webtest.TestApp(make_app())
    first.post_json("/contents/1/comments", {"body": "x"}, headers={"Authorization": token()})
    assert first.app.metrics.registry is not second.app.metrics.registry
    assert ("livecomments_writes_total", (("method", "POST"), ("status", "201"))) in scrape(first)
    assert not any(name == "livecomments_writes_total" for name, _ in scrape(second))


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_poller_without_a_successful_query_is_stale(store):
    clock = FakeClock()
    settings = make_settings(poll_interval=0.5, stale_after=10)
    hub = FeedHub(store, settings, clock=clock, start_threads=False)
    try:
        for content_id in (1, 2):
            hub.feed(content_id)
        [first, second] = hub.pollers()
        clock.now += 12
        first.tick()  # its query answers; the other's poller is stuck
        status = hub.staleness()
        assert status["count"] == 2 and status["stale_count"] == 1
        assert status["stale"] == {str(second.feed.content_id): 12.0}
        assert status["max_age"] == 12.0
        second.tick()
        assert hub.staleness()["stale_count"] == 0
    finally:
        hub.close()


def test_stale_after_follows_the_backoff_and_must_exceed_the_interval():
    assert make_settings().stale_after == 10
    assert make_settings(poll_backoff_max=8).stale_after == 16
    with pytest.raises(ValueError, match="stale_after"):
        make_settings(poll_interval=2, stale_after=1)


MULTIPROCESS = textwrap.dedent("""
    import sys, webtest
    sys.path.insert(0, "tests")
    from conftest import make_settings, SECRET
    from service.app import create_app
    from service.web.auth import TokenSigner
    token = "Bearer " + TokenSigner(SECRET).mint(1, "user", 60)
    app = create_app(make_settings(sys.argv[1]))
    client = webtest.TestApp(app)
    body = {"body": "x from " + sys.argv[2]}  # each process its own: no duplicate
    client.post_json("/contents/1/comments", body, headers={"Authorization": token})
    print(client.get("/metrics").text)
    app.close()
""")


def test_multiprocess_mode_aggregates_the_files_of_every_process(tmp_path):
    """Two processes writing to one PROMETHEUS_MULTIPROC_DIR, as two workers do."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    for n in range(2):
        run = subprocess.run([sys.executable, "-c", MULTIPROCESS, f"sqlite:///{tmp_path}/db",
                              str(n)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(run.stdout)
               for s in family.samples}
    assert samples["livecomments_writes_total", (("method", "POST"), ("status", "201"))] == 2
    # The first process was never marked dead: its gauges still count.
    assert samples["livecomments_hold_budget", ()] == 2 * make_settings().hold_budget
