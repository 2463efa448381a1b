"""Results out: a text table for the terminal, a JSON document for the record."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from datetime import datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The bench's client (one event loop) using more of one core than this in
#: a window is the bottleneck: on this shared 2-core machine it seldom gets
#: more than about 0.8 of one while the servers run.
CLIENT_BOUND = 0.75
PACKAGES = ("aiohttp", "psutil", "uvloop", "falcon", "waitress", "SQLAlchemy", "psycopg2-binary")


def percentile(values, pct):
    """Nearest-rank percentile, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def fmt(value, digits=0):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


class Column:
    def __init__(self, title, key, digits=0, width=None):
        self.title = title
        self.key = key
        self.digits = digits
        self.width = width or len(title)

    def cell(self, row):
        if callable(self.key):
            return self.key(row)
        return fmt(row.get(self.key), self.digits)


def text_table(rows, columns):
    cells = [[c.title for c in columns]] + [[c.cell(r) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def text_row(row, columns, header=False):
    """One row at the columns' fixed widths, to print as it comes."""
    cells = [c.title if header else c.cell(row) for c in columns]
    return "  ".join(cell.rjust(c.width) for cell, c in zip(cells, columns, strict=True))


def git_revision():
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        revision = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", "service", "schema.sql", "scripts"))
    except (OSError, subprocess.SubprocessError):
        return {"revision": "unknown", "dirty": None}
    return {"revision": revision, "dirty": dirty}


def versions():
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_info(command, argv, label):
    """What a results file says about where and how it was made."""
    return {
        "benchmark": command,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "scripts/bench", *argv]),
        "label": label,
        "git": git_revision(),
        "versions": versions(),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                    "system": f"{platform.system()} {platform.release()}"},
    }


def write_json(path, document):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Raw samples (keys starting with "_") stay out of the file.
    clean = json.loads(json.dumps(document, default=str),
                       object_hook=lambda d: {k: v for k, v in d.items()
                                              if not k.startswith("_")})
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path
