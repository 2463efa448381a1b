"""``livecomments serve`` as an operator runs it: a real process, settings
from the environment, SIGTERM at the end."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.web.auth import TokenSigner

SECRET = "serve-secret-0123456789abcdef"
REPO = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port, path, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())
    finally:
        conn.close()


def post(port, content_id, body, author_id=1):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        token = TokenSigner(SECRET).mint(author_id)
        conn.request("POST", f"/contents/{content_id}/comments", json.dumps({"body": body}),
                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture
def serve(tmp_path):
    """``serve(**env)``: ``python -m service serve`` with only these settings."""
    procs = []

    def start(**settings):
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOMMENTS_")}
        env.update(PYTHONPATH=str(REPO), LIVECOMMENTS_SECRET=SECRET,
                   LIVECOMMENTS_PORT=str(port),
                   LIVECOMMENTS_DATABASE_URL=f"sqlite:///{tmp_path / 'serve.db'}")
        env.update({f"LIVECOMMENTS_{k.upper()}": str(v) for k, v in settings.items()})
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        procs.append(proc)
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _, health = get(port, "/healthz", timeout=1)
                if status == 200:
                    return proc, port, health
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


def wait_until_held(port, count, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        held = get(port, "/healthz")[2]["held"]
        if held >= count or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


@pytest.mark.slow
def test_only_64_threads_set_gives_a_working_server(serve):
    """The hold budget follows the thread count: viewers beyond it are shed
    with poll_after_ms, and a post still finds a thread and reaches them."""
    proc, port, health = serve(threads=64)
    budget = health["hold_budget"]
    assert 0 < budget < 64
    _, _, first = get(port, "/contents/9/comments")
    since = first["cursor"]
    with ThreadPoolExecutor(budget + 4) as pool:
        viewers = [pool.submit(get, port, f"/contents/9/comments?since={since}&wait=20")
                   for _ in range(budget + 4)]
        assert wait_until_held(port, budget) == budget
        # A thread is free for the post (it does not queue behind the held
        # viewers until their 20 s run out: they would not be woken then).
        status, comment = post(port, 9, "through 64 threads")
        assert status == 201
        answers = [v.result(timeout=15)[2] for v in viewers]
    woken = [a for a in answers if a["comments"]]
    shed = [a for a in answers if not a["comments"]]
    assert len(woken) >= budget
    assert all(a["comments"][0]["id"] == comment["id"] for a in woken)
    assert all(a["poll_after_ms"] > 0 and a["cursor"] == since for a in shed)


@pytest.mark.slow
def test_sigterm_answers_held_viewers_then_stops(serve):
    """SIGTERM: held viewers are answered at once at their cursor, new reads
    and health checks get 503 while the answers drain, the process exits 0."""
    proc, port, _ = serve(threads=40, shutdown_drain=2)
    _, _, first = get(port, "/contents/3/comments")
    since = first["cursor"]
    with ThreadPoolExecutor(10) as pool:
        viewers = [pool.submit(get, port, f"/contents/3/comments?since={since}&wait=25")
                   for _ in range(10)]
        assert wait_until_held(port, 10) == 10
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        answers = [v.result(timeout=10) for v in viewers]
        answered_in = time.monotonic() - stopped_at
        status, headers, body = get(port, "/healthz")
        assert (status, body["status"]) == (503, "draining")
        status, headers, body = get(port, f"/contents/3/comments?since={since}")
        assert status == 503 and headers["Retry-After"] == "2" and body["title"]
    print(f"\nMEASURED SIGTERM: held viewers answered in {answered_in:.2f} s")
    # Answered by the drain: their 25 s wait had long to run (result(timeout=10)).
    assert all(status == 200 and page["comments"] == [] and page["cursor"] == since
               for status, _, page in answers)
    assert proc.wait(15) == 0
    log = proc.stdout.read()
    assert "stopped" in log and "Traceback" not in log
