"""The redirect to a read's canonical URL.

Every viewer at the same cursors must ask for the same URL, or a cache in
front keeps one copy per spelling and collapses nothing. A read of several
feeds whose ``feeds`` lists them in another order (or spells a number with
leading zeros) is sent, with 307, to the same URL with the canonical list;
the answer's own order is canonical, so a client building its next request
from it is redirected at most once.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

import falcon

#: Seconds a client or cache may keep the redirect: it depends on the URL
#: alone, so it never goes stale.
REDIRECT_MAX_AGE = 3600


def redirect_to_canonical(req, canonical):
    """Raise the 307 to ``req``'s URL with ``feeds`` set to ``canonical``,
    every other parameter kept as sent, in its order."""
    pairs = [(name, canonical if name == "feeds" else value)
             for name, value in parse_qsl(req.query_string, keep_blank_values=True)]
    location = f"{req.path}?{urlencode(pairs, safe=':,')}"
    raise falcon.HTTPTemporaryRedirect(
        location, headers={"Cache-Control": f"public, max-age={REDIRECT_MAX_AGE}"})
