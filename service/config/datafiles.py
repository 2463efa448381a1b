"""Files the project ships beside the package (``schema.sql``, the API document)."""

from __future__ import annotations

import sys
from pathlib import Path

#: Where setup.cfg's ``[options.data_files]`` installs them, under ``sys.prefix``.
INSTALLED_DIR = Path("share") / "livecomments"


def data_file(relative):
    """Find a shipped file by its path in the project, e.g. ``docs/openapi.yaml``.

    In a checkout (or an editable install) it is beside the package; once
    installed, data_files has flattened it into ``sys.prefix/share/livecomments/``.
    """
    relative = Path(relative)
    for candidate in (
        Path(__file__).resolve().parents[2] / relative,
        Path(sys.prefix) / INSTALLED_DIR / relative.name,
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{relative} not found beside the package or in {INSTALLED_DIR}/")
