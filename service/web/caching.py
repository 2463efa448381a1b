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
__all__ = ["CACHE_MS_HEADER", "cache_headers", "idle_poll_after_ms"]

#: Milliseconds a cache in front may keep a busy feed's answer, for caches
#: that read it (``deploy/varnish/livecomments.vcl``; s-maxage is whole
#: seconds). Named for this service: caches that do not know it ignore it.
CACHE_MS_HEADER = "Livecomments-Cache-Ms"

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
    headers = {"Cache-Control": f"public, max-age=0, s-maxage={seconds}", "Vary": vary}
    if page.changes and 0 < page.poll_after_ms < seconds * 1000:
        # A busy feed's answer asks its viewers to come back after its
        # pace; by then they have moved on, and a viewer still at this
        # cursor should get everything since, not this page and then the
        # next one. A cache that reads this (the shipped VCL) keeps it no
        # longer; one that does not keeps it s-maxage, which is correct,
        # only a hop or two more for a late viewer.
        headers[CACHE_MS_HEADER] = str(page.poll_after_ms)
    return headers
