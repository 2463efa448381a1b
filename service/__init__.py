"""livecomments: live comments over HTTP long-polling."""

from .app import create_app
from .config.settings import Settings

__all__ = ["Settings", "create_app"]
