"""``livecomments serve --workers 2``: real processes on one port, supervised.

Viewers are raw sockets (test_hold's ``Exchange``): each first asks
``/healthz`` on its connection, so it knows which worker (pid) holds it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from conftest import notify_channel_for
from prometheus_client.parser import text_string_to_metric_families
from sse_client import SSEClient
from test_hold import CONTENT, Exchange, collect, feed_path, report
from test_serve import REPO, SECRET, free_port, get, post

from service.config.settings import Settings, SettingsError
from service.serve.workers import RESTART_DELAY_MAX, RESTART_DELAY_MIN, restart_delay
from service.web.auth import TokenSigner


def test_workers_setting():
    assert Settings.from_env(environ={}).workers == 1
    assert Settings.from_env(environ={"LIVECOMMENTS_WORKERS": "4"}).workers == 4
    for bad in ({"workers": "0"}, {"workers": "2", "database_url": "sqlite://"},
                {"workers": "2", "database_url": "sqlite:///:memory:"}):
        with pytest.raises(SettingsError):
            Settings.from_env(environ={}, **bad)


def test_restart_delay_grows_while_workers_die_young():
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[0] == RESTART_DELAY_MIN
    assert delays == sorted(delays) and delays[-1] == RESTART_DELAY_MAX


class Service:
    """A supervisor process, its port and its log file."""

    def __init__(self, proc, port, log):
        self.proc = proc
        self.port = port
        self.log = log

    def health(self):
        status, _, body = get(self.port, "/healthz", timeout=5)
        assert status == 200, body
        return body

    def pids(self, connections=40):
        """Which worker answered each of ``connections`` new connections."""
        return Counter(self.health()["pid"] for _ in range(connections))

    def output(self):
        return self.log.read_text()


@pytest.fixture
def supervise(tmp_path):
    """``supervise(url, **settings)``: ``python -m service serve --workers 2``."""
    services = []

    def start(database_url, **settings):
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOMMENTS_")}
        env.update(PYTHONPATH=str(REPO), LIVECOMMENTS_SECRET=SECRET,
                   LIVECOMMENTS_PORT=str(port), LIVECOMMENTS_DATABASE_URL=database_url,
                   LIVECOMMENTS_THREADS="60", LIVECOMMENTS_SHUTDOWN_DRAIN="0.5")
        channel = notify_channel_for(database_url)
        if channel:
            env["LIVECOMMENTS_NOTIFY_CHANNEL"] = channel
        env.update({f"LIVECOMMENTS_{k.upper()}": str(v) for k, v in settings.items()})
        log = tmp_path / f"serve-{port}.log"
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--workers", "2"],
                                    cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        service = Service(proc, port, log)
        services.append(service)
        deadline = time.monotonic() + 30
        while True:
            try:
                if len(service.pids(10)) == 2:
                    return service
            except OSError:
                pass
            assert proc.poll() is None, service.output()
            assert time.monotonic() < deadline, f"both workers did not come up\n{service.output()}"
            time.sleep(0.1)

    yield start
    for service in services:
        if service.proc.poll() is None:
            service.proc.send_signal(signal.SIGTERM)
            try:
                service.proc.wait(15)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait(10)


@pytest.fixture
def pg_database(pg_url, make_store):
    make_store(pg_url)  # creates the schema's tables, as init-db would
    return pg_url


def viewers(port, n):
    """n connections, each told apart by the pid of the worker holding it."""
    exchanges = [Exchange(port).send("/healthz") for _ in range(n)]
    assert not collect(exchanges, timeout=10)
    for x in exchanges:
        x.pid = x.response.json["pid"]
    return exchanges


def viewers_in_both(service, each, most=400):
    """Connections, ``each`` of them held by either worker.

    The kernel hashes each new connection to one of the workers by its
    addresses and ports (SO_REUSEPORT): any number of them may land on one.
    So connections are opened (at most ``most``) until both workers have
    ``each``; the surplus ones are closed.
    """
    kept, opened = [], 0
    while True:
        counts = Counter(x.pid for x in kept)
        if len(counts) == 2 and min(counts.values()) >= each:
            return kept
        assert opened < most, f"{opened} connections reached workers {dict(counts)}"
        batch = viewers(service.port, 2 * each)
        opened += len(batch)
        for x in batch:
            if counts[x.pid] < each:
                counts[x.pid] += 1
                kept.append(x)
            else:
                x.close()


def hold_all(service, exchanges, cursor, wait=25):
    """Hold every viewer at ``cursor``; {pid: viewers} once all are held."""
    for x in exchanges:
        x.send(feed_path(cursor, wait))
    return wait_held(service, Counter(x.pid for x in exchanges))


def wait_held(service, want):
    held = {}
    deadline = time.monotonic() + 15
    while not all(held.get(pid, -1) >= count for pid, count in want.items()):
        assert time.monotonic() < deadline, f"held {held}, want {dict(want)}"
        health = service.health()  # a new connection: either worker
        held[health["pid"]] = health["held"]
    return want


def close(exchanges):
    for x in exchanges:
        x.close()


@pytest.mark.slow
def test_both_workers_answer_and_share_the_connections(supervise, sqlite_url):
    service = supervise(sqlite_url)
    spread = service.pids(200)
    print(f"\nMEASURED 200 connections over 2 workers (SO_REUSEPORT): {sorted(spread.values())}")
    assert len(spread) == 2
    assert min(spread.values()) >= 60  # hashed evenly, not to the quickest accepter
    assert service.proc.pid not in spread  # the supervisor serves nothing itself


@pytest.mark.slow
@pytest.mark.postgres
def test_a_post_through_one_worker_wakes_viewers_held_in_the_other(supervise, pg_database):
    # 30 s poll intervals: a wake within a second is a NOTIFY across workers.
    service = supervise(pg_database, poll_interval=30, notify_poll_interval=30)
    _, _, first = get(service.port, f"/contents/{CONTENT}/comments")
    cursor = first["cursor"]
    latencies = {}
    for round_ in range(5):
        exchanges = viewers_in_both(service, 6)
        try:
            want = hold_all(service, exchanges, cursor)
            assert len(want) == 2, want  # viewers on both workers
            sent = time.monotonic()
            status, comment = post(service.port, CONTENT, f"round {round_}")
            assert status == 201
            # Well within the 30 s between queries: the NOTIFY woke them all,
            # in the worker that took the POST and in the other.
            unanswered = collect(exchanges, timeout=10)
            assert not unanswered, (
                f"viewers not woken, by worker: {dict(Counter(x.pid for x in unanswered))} "
                f"(the POST went through one of {sorted(want)})")
        finally:
            close(exchanges)
        for x in exchanges:
            page = x.response.json
            assert [c["id"] for c in page["comments"]] == [comment["id"]], page
            latencies.setdefault(x.pid, []).append(x.done_at - sent)
        cursor = comment["seq"]
    for pid, samples in latencies.items():
        report(f"wake in worker {pid} (from sending the POST)", samples)


@pytest.mark.slow
@pytest.mark.postgres
def test_a_killed_worker_is_replaced_and_the_service_keeps_answering(supervise, pg_database):
    service = supervise(pg_database)
    _, _, first = get(service.port, f"/contents/{CONTENT}/comments")
    cursor = first["cursor"]
    exchanges = viewers_in_both(service, 6)
    try:
        want = hold_all(service, exchanges, cursor)
        victim, survivor = sorted(want)
        os.kill(victim, signal.SIGKILL)
        # The victim's viewers lose their connection: one reconnect each.
        dropped = [x for x in exchanges if x.pid == victim]
        collect(dropped, timeout=5)
        assert all(x.eof for x in dropped)
        # The service keeps answering, and a new worker takes the victim's place.
        # A connection the dying worker's queue had taken is reset: the
        # client retries, as it would after any lost connection.
        deadline = time.monotonic() + 20
        resets = 0
        while True:
            try:
                pids = set(service.pids(10))
            except ConnectionError:
                resets += 1
                assert resets <= 3, "the service keeps refusing connections"
                continue
            if len(pids) == 2 and victim not in pids:
                break
            assert time.monotonic() < deadline, f"no replacement worker: {pids}"
            time.sleep(0.1)
        (replacement,) = pids - {survivor}
        again = viewers(service.port, 8)
        exchanges += again
        for x in again:
            x.send(feed_path(cursor, 25))
        wait_held(service, Counter(x.pid for x in exchanges if x.pid != victim))
        status, comment = post(service.port, CONTENT, "after the kill")
        assert status == 201
        held = [x for x in exchanges if x.pid != victim]
        assert not collect(held, timeout=5)
        for x in held:
            assert [c["id"] for c in x.response.json["comments"]] == [comment["id"]]
    finally:
        close(exchanges)
    assert f"worker {victim} was killed by SIGKILL" in service.output()
    assert service.proc.poll() is None


@pytest.mark.slow
@pytest.mark.postgres
def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(supervise, pg_database):
    service = supervise(pg_database, shutdown_timeout=3)
    _, _, first = get(service.port, f"/contents/{CONTENT}/comments")
    cursor = first["cursor"]
    exchanges = viewers_in_both(service, 6)
    try:
        want = hold_all(service, exchanges, cursor)
        assert len(want) == 2
        stopped_at = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        # Answered by the drain, long before their 25 s wait runs out.
        assert not collect(exchanges, timeout=10), "held viewers were not answered"
        answered_in = max(x.done_at for x in exchanges) - stopped_at
        for x in exchanges:
            assert x.response.status == 200
            assert x.response.json["comments"] == [] and x.response.json["cursor"] == cursor
        # drain 0.5 + shutdown timeout 3 + grace 1: the supervisor's deadline.
        assert service.proc.wait(10) == 0
        exited_in = time.monotonic() - stopped_at
    finally:
        close(exchanges)
    print(f"\nMEASURED SIGTERM: held viewers answered in {answered_in:.2f} s, "
          f"supervisor exited in {exited_in:.2f} s")
    log = service.output()
    assert "all workers stopped" in log and "Traceback" not in log
    assert log.count("exited with code 0") == 2
    for pid in want:
        assert not alive(pid), f"worker {pid} outlived the supervisor"


@pytest.mark.slow
def test_workers_stop_when_the_supervisor_is_killed(supervise, sqlite_url):
    service = supervise(sqlite_url)
    workers = set(service.pids(20))
    service.proc.kill()
    service.proc.wait(5)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "orphaned workers kept running"
        time.sleep(0.1)


def alive(pid):
    """True while ``pid`` runs (a zombie waiting to be reaped is not running)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.postgres
def test_metrics_of_every_worker_in_each_scrape(supervise, pg_database):
    """Multiprocess metrics: writes through both workers, counted whichever answers."""
    service = supervise(pg_database, post_rate="0")
    # Connections known to be held by either worker (6 each): 12 writes,
    # 6 through each, then a scrape through each.
    exchanges = viewers_in_both(service, 6)
    try:
        for k, x in enumerate(exchanges):
            token = TokenSigner(SECRET).mint(k + 1)
            x.send(f"/contents/{CONTENT}/comments", method="POST",
                   body=json.dumps({"body": f"counted {k}"}).encode(),
                   headers={"Authorization": f"Bearer {token}",
                            "Content-Type": "application/json"})
        assert not collect(exchanges, timeout=10)
        assert [x.response.status for x in exchanges] == [201] * 12
        scrapers = {x.pid: x for x in exchanges}.values()  # one per worker
        for x in scrapers:
            x.send("/metrics")
        assert not collect(scrapers, timeout=10)
    finally:
        close(exchanges)
    for x in scrapers:
        text = x.response.body.decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples["livecomments_writes_total",
                       (("method", "POST"), ("status", "201"))] == 12, (x.pid, text)
        assert samples["livecomments_hold_budget", ()] == 2 * 54  # 60 threads × 10 ÷ 11, twice


# -- moderation across workers -------------------------------------------------

MODERATOR = 99


def call(x, method, path, document=None, *, author_id=None, role="user"):
    """``method path`` on the connection ``x`` (so through the worker holding
    it), as ``author_id`` if given; its response."""
    headers, body = {}, b""
    if author_id is not None:
        headers["Authorization"] = f"Bearer {TokenSigner(SECRET).mint(author_id, role)}"
    if document is not None:
        headers["Content-Type"] = "application/json"
        body = json.dumps(document).encode()
    x.send(path, method=method, headers=headers, body=body)
    assert not collect([x], timeout=10), f"no answer to {method} {path}"
    return x.response


def moderate(x, method, path, document=None):
    resp = call(x, method, path, document, author_id=MODERATOR, role="moderator")
    assert resp.status in (200, 201), resp
    assert resp.headers["cache-control"] == "no-store"
    return resp.json


def woken_pages(service, viewers, cursor, last):
    """Every viewer's page from ``cursor`` (the answer it was woken with,
    and more pages only if it was cut short) up to ``last``:
    [(viewer, changes in seq order, its last page)]."""
    unanswered = collect(viewers, timeout=10)
    assert not unanswered, (
        f"viewers not woken, by worker: {dict(Counter(x.pid for x in unanswered))}")
    pages = []
    for x in viewers:
        assert x.response.status == 200, x.response
        page = x.response.json
        seen = sorted(page["comments"] + page["events"], key=lambda c: c["seq"])
        while page["cursor"] < last:
            x.send(feed_path(page["cursor"], 5))
            assert not collect([x], timeout=10)
            page = x.response.json
            seen += sorted(page["comments"] + page["events"], key=lambda c: c["seq"])
        assert page["cursor"] == last, page
        pages.append((x, seen, page))
    return pages


@pytest.mark.slow
@pytest.mark.postgres
def test_moderation_through_one_worker_holds_at_once_in_the_other(supervise, pg_database):
    """A ban with retraction, slow mode, a pin and a closing, each made
    through one worker: the other refuses at once what each forbids (the
    database is the truth), and the viewers held in both workers are woken
    by each change with the new room (30 s poll intervals: in the other
    worker, by the NOTIFY); the streams open in both name the room, then
    ``closed``, and end."""
    service = supervise(pg_database, poll_interval=30, notify_poll_interval=30)
    comments = f"/contents/{CONTENT}/comments"
    connections = viewers_in_both(service, 5)
    by_pid = {}
    for x in connections:
        by_pid.setdefault(x.pid, []).append(x)
    here, there = sorted(by_pid)  # moderated through `here`, checked through `there`
    actor, other = by_pid[here].pop(), by_pid[there].pop()
    streams_at = [by_pid[here].pop(), by_pid[there].pop()]
    viewers_ = by_pid[here] + by_pid[there]  # 3 in each worker
    try:
        spam = [call(other, "POST", comments, {"body": f"buy now {n}"}, author_id=7).json
                for n in range(5)]
        fine = call(other, "POST", comments, {"body": "a real comment"}, author_id=8).json
        cursor = fine["seq"]

        # A ban with retraction: 5 tombstones and the ban, at once in both.
        hold_all(service, viewers_, cursor)
        ban = moderate(actor, "POST", f"/contents/{CONTENT}/bans",
                       {"author_id": 7, "retract": True})
        assert ban["retracted"] == 5
        last = cursor + 6
        for _, seen, page in woken_pages(service, viewers_, cursor, last):
            assert [(c.get("id"), c.get("type")) for c in seen] == [
                (c["id"], None) for c in spam] + [(None, "ban")]
            assert all(c["deleted"] for c in seen[:5]) and seen[-1]["author_id"] == 7
            assert page["room"] == {"closed": False, "slow_mode_seconds": 0, "pinned": None}
        refused = call(other, "POST", comments, {"body": "again"}, author_id=7)
        assert (refused.status, refused.json["code"], refused.json["until"]) == (
            403, "banned", None)
        cursor = last

        # Slow mode: the new room in both; the other worker's 429.
        hold_all(service, viewers_, cursor)
        slow = moderate(actor, "PATCH", f"/contents/{CONTENT}/room", {"slow_mode_seconds": 60})
        for _, seen, page in woken_pages(service, viewers_, cursor, cursor + 1):
            assert [(e["type"], e["room"]) for e in seen] == [("room", slow)]
            assert page["room"] == slow and slow["slow_mode_seconds"] == 60
        first = call(other, "POST", comments, {"body": "slowly"}, author_id=9)
        assert first.status == 201, first
        refused = call(other, "POST", comments, {"body": "too soon"}, author_id=9)
        assert (refused.status, refused.json["code"]) == (429, "slow_mode")
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        cursor = first.json["seq"]

        # A pin: the pinned comment in both.
        hold_all(service, viewers_, cursor)
        pinned = moderate(actor, "PATCH", f"/contents/{CONTENT}/room",
                          {"pinned_comment_id": first.json["id"]})
        assert pinned["pinned"] == first.json
        for _, seen, page in woken_pages(service, viewers_, cursor, cursor + 1):
            assert [(e["type"], e["room"]) for e in seen] == [("room", pinned)]
            assert page["room"] == pinned
        cursor += 1

        # Closing: viewers and streams in both workers are told.
        hold_all(service, viewers_, cursor)
        streams = [SSEClient(service.port, f"{comments}/stream", sock=x.sock)
                   for x in streams_at]
        for stream in streams:
            assert stream.head() == 200
        wait_streams(service, {here, there})
        closed = moderate(actor, "PATCH", f"/contents/{CONTENT}/room", {"closed": True})
        assert closed == {**pinned, "closed": True}
        for _, seen, page in woken_pages(service, viewers_, cursor, cursor + 1):
            assert [(e["type"], e["room"]) for e in seen] == [("room", closed)]
            assert page["room"] == closed and page["poll_after_ms"] == 300000
        for stream in streams:
            events = [e for e in stream.until_end(timeout=10) if e.event != "keepalive"]
            assert [(e.event, e.id) for e in events] == [
                ("room", cursor), ("room", cursor + 1), ("closed", cursor + 1)]
            assert events[0].json == pinned and events[1].json == events[2].json == closed
        refused = call(other, "POST", comments, {"body": "late"}, author_id=8)
        assert (refused.status, refused.json["code"]) == (409, "closed")
        assert call(other, "GET", f"/contents/{CONTENT}/room").json == closed
        again = SSEClient(service.port, f"{comments}/stream", sock=other.sock)
        assert again.head() == 204
    finally:
        close(connections)


def wait_streams(service, pids):
    """Until every worker of ``pids`` has a stream open."""
    streams = {}
    deadline = time.monotonic() + 15
    while not all(streams.get(pid, 0) >= 1 for pid in pids):
        assert time.monotonic() < deadline, f"streams open by worker: {streams}"
        health = service.health()
        streams[health["pid"]] = health["streams"]


@pytest.mark.parametrize("workers", [2, 1])
def test_a_second_instance_on_a_served_port_refuses_to_start(supervise, sqlite_url, tmp_path,
                                                             workers):
    """A forgotten instance or an upgrade started before the old one stopped
    must not take a share of the port's connections (SO_REUSEPORT lets it):
    it refuses in one line and exits non-zero; the first keeps every one."""
    service = supervise(sqlite_url)
    before = set(service.pids(20))
    other = tmp_path / "other"
    other.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOMMENTS_")}
    env.update(PYTHONPATH=str(REPO), LIVECOMMENTS_SECRET=SECRET,
               LIVECOMMENTS_PORT=str(service.port),
               LIVECOMMENTS_DATABASE_URL=f"sqlite:///{other / 'other.db'}")
    second = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--workers", str(workers)],
        cwd=other, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1, second.stderr
    assert "Traceback" not in second.stderr
    (line,) = [text for text in second.stderr.splitlines() if "livecomments:" in text]
    assert f"address in use: 127.0.0.1:{service.port}" in line
    # Every connection still reaches the first instance's two workers.
    assert set(service.pids(60)) == before
    assert not (other / "other.db").exists()  # refused before the database was touched
