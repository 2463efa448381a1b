"""The project's benchmarks: ``.venv/bin/python scripts/bench COMMAND --help``."""
