"""Entry point: ``python scripts/bench COMMAND`` (or ``python -m bench`` from scripts/)."""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE.parent.parent / ".venv"


def reexec_in_venv():
    """Under a python without the bench extra, re-run under the project's venv."""
    try:
        import aiohttp  # noqa: F401
    except ImportError as exc:
        python = VENV / "bin" / "python"
        if python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
            os.execv(python, [str(python), str(HERE), *sys.argv[1:]])
        raise SystemExit("bench: needs the bench extra: "
                         ".venv/bin/pip install -e '.[bench]'") from exc


def main():
    reexec_in_venv()
    # Import the modules as the package ``bench``, not as loose top-level
    # modules from this folder (``python scripts/bench`` puts it on the path).
    if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
        sys.path.pop(0)
    sys.path.insert(0, str(HERE.parent))
    from bench.cli import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
