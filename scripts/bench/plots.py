"""The report's plots (matplotlib, no display): one PNG per figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server

import matplotlib.pyplot as plt  # noqa: E402


def draw(results, fanout_table, directory):
    """{title: path} of the plots the results allow. ``fanout_table`` is
    the fan-out's (rows, ceiling), as the report's ``fanout_rows`` gives
    them: passed in, so this module needs nothing of the report."""
    images = {}
    rows, ceiling = fanout_table
    if rows:
        images["Fan-out p99 against viewers"] = fanout(rows, ceiling, directory / "fanout.png")
    if results.get("dbload"):
        images["Database load against viewers"] = dbload(results["dbload"],
                                                         directory / "dbload.png")
    if results.get("throughput"):
        images["Throughput against the ceiling"] = throughput(results["throughput"],
                                                              directory / "throughput.png")
    if results.get("event"):
        images["Live event: delivery latency"] = event(results["event"], directory / "event.png")
        series = event_series(results["event"])
        if any(len(points) > 1 for points in series.values()):
            images["Live event: p99 against viewers"] = event_by_v(
                series, "p99_ms", "delivery p99, ms", directory / "event-p99.png")
            images["Live event: server CPU per 1,000 deliveries against viewers"] = event_by_v(
                series, "cpu_ms_per_1k", "server CPU ms per 1,000 deliveries",
                directory / "event-cpu.png")
    return images


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def fanout(rows, ceiling, path):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label in sorted({label for label, _ in rows}):
        points = sorted((v, r["p99_ms"]) for (lab, v), r in rows.items()
                        if lab == label and r["p99_ms"] is not None)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    if ceiling:
        vs = sorted({v for _, v in rows})
        ax.plot(vs, [v / ceiling * 1000 for v in vs], "k--", label="V ÷ ceiling (bare stack)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("held viewers V")
    ax.set_ylabel("delivery p99, ms")
    ax.set_title("One comment to V held viewers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def dbload(docs, path):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for design, style in (("service", "o-"), ("seed", "s--")):
        points = sorted((r["V"], r["db_tps"]) for doc in docs for r in doc["rows"]
                        if r["design"] == design)
        if points:
            ax.plot(*zip(*points, strict=True), style, label=design)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("viewers V")
    ax.set_ylabel("database transactions/s")
    ax.set_title("Database load: long-poll feeds vs every viewer polling")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def throughput(docs, path):
    rows = docs[-1]["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = [r["what"] for r in rows]
    bars = ax.barh(names, [r["rps"] for r in rows], color="tab:blue")
    for bar, row in zip(bars, rows, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {100 * row['of_ceiling']:.0f} %", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("requests/s (closed loop)")
    ax.set_title("Throughput next to the bare stack's ceiling")
    return _save(fig, path)


def event(docs, path):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for doc in docs:
        for row in doc["rows"]:
            cdf = row.get("cdf_ms") or []
            points = [(ms, p) for p, ms in enumerate(cdf, start=1) if ms is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=event_label(row))
    ax.set_xscale("log")
    ax.set_xlabel("latency from POST to viewer, ms")
    ax.set_ylabel("percentile")
    ax.set_title("Live event: every delivery")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def event_label(row):
    label = f"{row.get('via', 'direct')} V={row['V']:,} C={row['contents']}"
    if row.get("busy_pace_ms") is not None:
        label += f" pace {row['busy_pace_ms']}"
    if (row.get("workers") or 1) > 1:
        label += f" ×{row['workers']}"
    return label


def event_series(docs):
    """{(via, contents, pace, workers): [row by V]} of the event runs with
    the most paths (every path of a V in one run: compare within a V)."""
    def paths(doc):
        return len({row.get("via", "direct") for row in doc["rows"]})

    best = max(map(paths, docs), default=0)
    series = {}
    for row in (r for doc in docs if paths(doc) == best > 1 for r in doc["rows"]):
        key = (row.get("via", "direct"), row["contents"], row.get("busy_pace_ms"),
               row.get("workers") or 1)
        series.setdefault(key, []).append(row)
    return series


def event_by_v(series, key, ylabel, path):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {}
    for (via, contents, _pace, workers), rows in sorted(series.items(), key=str):
        points = sorted((r["V"], r[key]) for r in rows if r.get(key) is not None)
        if len(points) > 1:
            label = f"{via}, {contents} content{'s' if contents > 1 else ''}"
            label += f", ×{workers}" if workers > 1 else ""
            colour = colours.setdefault(via, f"C{len(colours)}")
            ax.plot(*zip(*points, strict=True), marker="o", color=colour,
                    linestyle="-" if contents == 1 else "--", label=label)
    rate = next(iter(series.values()))[0]["rate"]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("viewers V")
    ax.set_ylabel(ylabel)
    ax.set_title(f"Live event, {rate:g} comments/s (every path in one run per V)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
