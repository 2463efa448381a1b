"""The import rules of ``service/``'s layers (docs/design.md, "Layers"),
read from the source: every ``import`` and ``from … import``, at module
level or inside a function.

- ``config`` and ``common`` import nothing else of the service;
- ``live``, ``db`` and ``serve`` import ``config`` and ``common`` only, so
  none of them sees another (the hub knows no SQL, the store no HTTP, the
  server no app);
- ``web`` imports ``live``, ``config`` and ``common``, and from ``db`` only
  the value and error types named in ``WEB_MAY_TAKE_FROM_DB``;
- only ``service/app.py`` and ``service/cli.py`` (and the package's
  ``__init__``/``__main__``) see everything;
- third-party libraries stay in their layer: SQLAlchemy and the database
  drivers in ``db``, Falcon in ``web``, waitress in ``serve``;
- no import cycle among the service's modules, nor among the bench's.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"
BENCH = ROOT / "scripts" / "bench"

#: Which layers each layer may import (besides itself).
ALLOWED = {
    "config": set(),
    "common": set(),
    "live": {"config", "common"},
    "db": {"config", "common"},
    "serve": {"config", "common"},
    "web": {"live", "config", "common", "db"},  # db: only the names below
}
#: The only names ``web`` takes from ``db``: what the store answers with and
#: the refusals a request maps to an HTTP status.
WEB_MAY_TAKE_FROM_DB = {
    "service.db.idempotency": {"IdempotencyKey", "KeyReused"},
    "service.db.limits": {"RateLimited"},
    "service.db.replies": {"ParentMissing", "ParentDeleted"},
    "service.db.moderation": {"Banned", "Closed", "Duplicate", "InvalidPin", "SlowMode"},
}
#: Third-party packages and the one layer (or top-level module) each may be
#: imported from.
LIBRARY_HOMES = {
    "sqlalchemy": {"db"},
    "psycopg2": {"db"},
    "sqlite3": {"db"},
    "falcon": {"web", "app"},
    "waitress": {"serve"},
}
TOP = {"app", "cli", "__init__", "__main__"}


def module_name(path, root, package):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def imports_of(path, name):
    """``(imported module, names taken, line)`` for every import in ``path``;
    relative imports resolved against ``name``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, set(), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = {alias.name for alias in node.names}
            # ``from . import x`` may name submodules: count each as imported.
            subs = [f"{target}.{n}" for n in names]
            found.append((target, names, node.lineno))
            found += [(sub, set(), node.lineno) for sub in subs]
    return found


def modules(root, package):
    return {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}


def layer(name):
    """``live`` for ``service.live.hub``; ``app`` for ``service.app``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


SERVICE_MODULES = modules(SERVICE, "service")


def violations(mods=SERVICE_MODULES):
    out = []
    for name, path in mods.items():
        own = layer(name)
        for target, names, line in imports_of(path, name):
            where = f"{name}:{line}"
            top = target.split(".")[0]
            if top in LIBRARY_HOMES and own not in LIBRARY_HOMES[top]:
                out.append(f"{where}: {own} imports {top}")
            if top != "service" or own in TOP:
                continue
            if target not in mods and target.rpartition(".")[0] in mods:
                continue  # a name imported from a module, counted with the module
            other = layer(target)
            if other == own or target == "service":
                continue
            if other not in ALLOWED.get(own, set()):
                out.append(f"{where}: {own} imports {target}")
            elif own == "web" and other == "db":
                allowed = WEB_MAY_TAKE_FROM_DB.get(target)
                if allowed is None or not names or not names <= allowed:
                    out.append(f"{where}: web imports {sorted(names) or target} from {target}")
    return out


def test_every_service_module_is_in_a_layer():
    stray = [n for n in SERVICE_MODULES if layer(n) not in ALLOWED and layer(n) not in TOP]
    assert stray == []


def test_layers_import_only_what_their_rules_allow():
    assert violations() == []


def test_the_rules_catch_an_upward_import(tmp_path):
    """The checker itself: a live module importing Falcon and the store fails."""
    bad = tmp_path / "bad.py"
    bad.write_text("import falcon\nfrom ..db.store import Store\n")
    found = violations({**SERVICE_MODULES, "service.live.bad": bad})
    assert any("live imports falcon" in v for v in found)
    assert any("live imports service.db.store" in v for v in found)


def cycles(graph):
    """Every strongly connected set of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def import_graph(mods):
    graph = defaultdict(set)
    for name, path in mods.items():
        graph[name]
        for target, _names, _line in imports_of(path, name):
            if target in mods and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


@pytest.mark.parametrize("root,package", [(SERVICE, "service"), (BENCH, "bench")],
                         ids=["service", "bench"])
def test_no_import_cycles(root, package):
    assert cycles(import_graph(modules(root, package))) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
