"""The one JSON error document, and the error the store raises when the
database does not answer (so no layer above ``db`` needs SQLAlchemy's)."""

from __future__ import annotations

import json

#: Media type of every error document.
ERROR_MEDIA_TYPE = "application/json"


class StoreUnavailable(Exception):
    """The database did not answer (refused, dropped, timed out) or failed
    the statement. Retrying later may succeed; the store has already
    rolled back. The message is one line; the driver's error is the cause."""


def error_document(title, description=None, **extra):
    """The body of every error the service sends, as bytes: ``title`` and
    ``description`` (the title again when there is none), plus ``extra``."""
    body = {"title": title, "description": description or title}
    body.update(extra)
    return json.dumps(body).encode()
