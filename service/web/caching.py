"""What an HTTP cache in front may do with a feed answer, by its kind.

With ``shared_cache_seconds`` at 0 every feed answer is ``no-store``. Above
0 the cursor in the URL does the rest: every viewer at one cursor asks for
the same URL and gets the same bytes, so a cache that collapses concurrent
misses (Varnish, nginx with ``proxy_cache_lock``) turns the viewers held at
one URL into one held request upstream, and its answer into theirs.

A cache that collapses misses must be able to keep every answer that ends a
hold, empty ones included: an answer it may not keep releases the viewers
waiting for it to the service, one held request each (nginx, and Varnish's
hit-for-miss) or one after another (Varnish with a zero TTL). So a timeout
is shared for as long as a change is, and says so in its body: it asks its
clients to pause that long (``poll_after_ms``), which brings them back once
it has left the cache instead of fetching it again and again.
"""

from __future__ import annotations

from ..live.pages import Kind, idle_poll_after_ms

# idle_poll_after_ms (the pause a cached empty answer asks for) is the
# pages' rule; re-exported beside the cache headers it matches.
__all__ = ["cache_headers", "idle_poll_after_ms"]

# Answers that end a hold (woken, timeout), and the answers anyone may ask
# for again at once (latest, catch-up, empty), are the same for every viewer
# of their URL for a while. A shed answer speaks of one moment of one
# process's capacity, a reset of one client gone astray: kept, they would
# turn away or reset viewers the service would have served.
_SHAREABLE = frozenset({Kind.LATEST, Kind.CATCH_UP, Kind.WOKEN, Kind.TIMEOUT, Kind.EMPTY})


def cache_headers(page, settings):
    """The caching headers of a feed answer: {name: value}."""
    seconds = settings.shared_cache_seconds
    if not seconds or page.kind not in _SHAREABLE:
        return {"Cache-Control": "no-store"}
    # max-age=0: a browser's own cache must not keep what a shared one may.
    # Prefer: "Prefer: wait=N" changes the hold and adds Preference-Applied.
    # Origin: CORS headers follow the request's Origin (none without it).
    # Accept and Accept-Encoding come from the format (lines, gzip).
    vary = "Prefer, Origin" if settings.cors_origins else "Prefer"
    return {"Cache-Control": f"public, max-age=0, s-maxage={seconds}", "Vary": vary}
