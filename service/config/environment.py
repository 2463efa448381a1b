"""Settings from text: the ``LIVECOMMENTS_*`` environment variables and
the ``serve`` flags, each converted by the parser its setting declares
(or else by its type). The service's variables are read here and nowhere
else; :meth:`~.settings.Settings.from_env` builds the settings from what
:func:`read` returns."""

from __future__ import annotations

import os

#: A setting without a parser of its own is converted by its annotation
#: (text, under ``from __future__ import annotations``).
_TYPES = {"int": int, "float": float, "str": str, "str | None": str,
          "int | None": int, "float | None": float}


def read(fields, environ=None, overrides=None):
    """The values of the settings ``fields`` (dataclass fields declaring
    ``env`` and ``parse``), by name: those set in ``environ``
    (``os.environ`` by default; an empty variable counts as unset), then
    ``overrides`` on top.

    Overrides that are None are ignored, so parsed CLI flags can be passed
    straight through; text is converted as a variable's would be, other
    values are taken as they are. Raises ValueError naming the setting for
    a value its parser refuses, or for an override that is no setting.
    """
    environ = os.environ if environ is None else environ
    by_name = {f.name: f for f in fields}
    values = {}
    for f in by_name.values():
        raw = environ.get(f.metadata["env"])
        if raw is not None and raw != "":
            values[f.name] = convert(f, raw)
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        f = by_name.get(name)
        if f is None:
            raise ValueError(f"unknown setting {name!r}")
        values[name] = convert(f, value) if isinstance(value, str) else value
    return values


def convert(f, raw):
    """The value of setting ``f`` that the text ``raw`` gives."""
    parse = f.metadata["parse"]
    if parse is None:
        parse = f.type if isinstance(f.type, type) else _TYPES.get(f.type, str)
    try:
        return parse(raw)
    except ValueError as exc:
        raise ValueError(f"{f.name} ({f.metadata['env']}): invalid value {raw!r}: {exc}") from None
