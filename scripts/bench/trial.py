"""One fan-out trial on a running service: hold V viewers, post W comments, time them."""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass

import psutil

from .table import percentile
from .viewers import Audience, Control

#: Seconds the service's metrics thread may take to copy its counts to /metrics.
METRICS_LAG = 1.2


@dataclass
class TrialPlan:
    """What every trial of a run does; see ``fanout --help``."""

    content_id: int
    posts: int
    post_gap: float
    wait: int
    settle: float
    tail: float
    db_window: float
    timeout: float
    connect_batch: int
    hold_budget: int
    token: str
    tag: str


async def run_trial(plan, service, counter, v, number, *, url=None, expected_held=None):
    """A result row for V viewers on ``service`` (``counter``: DB transactions, or None).

    ``url``: where the viewers go (a cache in front; default the service),
    and the long-polls the service then holds (default min(V, budget)).
    """
    bodies = {f"bench {plan.tag} V{v} trial {number} post {k}": k for k in range(plan.posts)}
    audience = Audience(url or service.url, plan.content_id, v, bodies=bodies, wait=plan.wait,
                        connect_batch=plan.connect_batch)
    control = Control(service.url, plan.token)
    if expected_held is None:
        expected_held = min(v, plan.hold_budget)
    row = {"V": v, "trial": number, "status": "ok", "expected": v * plan.posts}
    started = time.perf_counter()
    try:
        # The bench's own connection first: V viewers may fill the server's
        # connection limit, and it must still reach /metrics and post.
        await control.held()
        audience.start()
        await wait_held(control, audience, expected_held, started + plan.timeout / 2)
        row["setup_s"] = time.perf_counter() - started
        await asyncio.sleep(plan.settle)
        row["held"] = await control.held()
        if row["held"] != expected_held:
            row["status"] = "held not reached"
        row.update(await measure(plan, service, counter, audience, control))
    finally:
        gc.enable()
        await audience.close()
        # Behind a cache the upstream hold runs its course: do not wait it out.
        row["held_after_close"] = await wait_held(control, None, 0,
                                                  time.perf_counter() + (15 if url is None else 1))
        await control.close()
    held, shed = audience.latencies()
    row.update(
        delivered=len(held) + len(shed), shed=sum(map(len, audience.shed)),
        shed_responses=audience.shed_responses, duplicates=audience.duplicates,
        errors=len(audience.errors), error_sample=sorted(set(audience.errors))[:3],
        _held=held, _shed=shed, **latency_figures(held, shed),
    )
    if row["delivered"] < row["expected"] and row["status"] == "ok":
        row["status"] = "timeout"
    return row


async def measure(plan, service, counter, audience, control):
    """Post, wait for every delivery, and read the server's figures around it."""
    db_start = counter.read() if counter else None
    answers_before = await control.answers()
    before = service.usage()
    bench_before, machine_before = psutil.Process().cpu_times(), psutil.cpu_times()
    gc.disable()  # no collection pauses while arrivals are timed
    first = time.perf_counter()
    posts = [asyncio.create_task(post(plan, control, audience, k, first + k * plan.post_gap))
             for k in range(plan.posts)]
    try:
        await asyncio.wait_for(audience.complete.wait(), plan.timeout)
    except TimeoutError:
        pass  # the row shows delivered < expected
    answers = await asyncio.gather(*posts)
    await asyncio.sleep(max(plan.tail, first + plan.db_window - time.perf_counter()))
    gc.enable()
    after, db_end = service.usage(), counter.read() if counter else None
    await asyncio.sleep(METRICS_LAG)
    answers_after = await control.answers()
    bench_after, machine_after = psutil.Process().cpu_times(), psutil.cpu_times()
    cpu_s = after.cpu_s - before.cpu_s
    bench_s = bench_after.user + bench_after.system - bench_before.user - bench_before.system
    busy_s = busy_seconds(machine_after) - busy_seconds(machine_before)
    return {
        "rss_mb": before.rss_mb, "cpu_s": cpu_s, "bench_cpu_s": bench_s,
        "other_cpu_s": max(0.0, busy_s - cpu_s - bench_s),
        "window_s": time.perf_counter() - first,
        "db_tps": counter.rate(db_start, db_end) if counter else None,
        "post_status": [status for status, _ in answers],
        **upstream(answers_before, answers_after, plan.posts),
        "post_ms": max((ms for _, ms in answers if ms is not None), default=None),
    }


async def post(plan, control, audience, k, when):
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    body = next(body for body, index in audience.bodies.items() if index == k)
    audience.before_post(k)
    return await control.post(plan.content_id, body, lambda sent: audience.posted(k, sent))


async def wait_held(control, audience, held, deadline):
    """Wait until the server holds ``held`` long-polls (and every viewer has its cursor).

    Returns the last ``held`` /healthz reported.
    """
    now_held = None
    while time.perf_counter() < deadline:
        now_held = await control.held()
        if now_held == held and (audience is None or audience.ready == len(audience.viewers)):
            break
        await asyncio.sleep(0.2)
    return now_held


def upstream(before, after, posts):
    """The service's own count of the feed answers it gave in the window:
    woken ones per comment (V direct; 1 behind a collapsing cache), and all."""
    if before is None or after is None:
        return {}
    delta = {kind: after.get(kind, 0) - before.get(kind, 0) for kind in after}
    return {"upstream_woken_per_post": delta.get("woken", 0) / posts,
            "upstream_answers": sum(delta.values()), "upstream_by_kind": delta}


def busy_seconds(times):
    """CPU seconds the whole machine spent not idle, from ``psutil.cpu_times()``."""
    names = ("user", "nice", "system", "irq", "softirq", "steal")  # guest is within user
    return sum(getattr(times, name, 0.0) for name in names)


def latency_figures(held, shed):
    return {"p50_ms": percentile(held, 50), "p99_ms": percentile(held, 99),
            "max_ms": max(held, default=None), "retry_max_ms": max(shed, default=None)}


def summarise(v, rows):
    """One row for V over its trials: latencies pooled, counts summed, figures averaged."""
    held = [x for r in rows for x in r.get("_held", ())]
    shed = [x for r in rows for x in r.get("_shed", ())]
    p99s = [r["p99_ms"] for r in rows if r.get("p99_ms") is not None]

    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {
        "V": v, "trials": len(rows),
        "held": "/".join(sorted({str(r.get("held")) for r in rows})),
        **{key: sum(r.get(key, 0) for r in rows)
           for key in ("delivered", "expected", "shed", "errors")},
        **latency_figures(held, shed),
        "p99_range": f"{min(p99s):.0f}-{max(p99s):.0f}" if p99s else None,
        "post_ms": max((r["post_ms"] for r in rows if r.get("post_ms")), default=None),
        "cpu_s": mean("cpu_s"), "rss_mb": mean("rss_mb"), "db_tps": mean("db_tps"),
        "upstream_woken_per_post": mean("upstream_woken_per_post"),
        "other_cpu_s": mean("other_cpu_s"),
    }
