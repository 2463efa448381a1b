vcl 4.1;

# livecomments behind Varnish (7.x): the viewers held at one feed URL are one
# held request upstream, and its answer is theirs. Run the service with
# LIVECOMMENTS_SHARED_CACHE_SECONDS=1 (or 2): with it at 0 every feed answer
# is no-store, and the viewers waiting for one URL would be passed to the
# service one hold after another. See deploy/README.md.

import std;

# The service (LIVECOMMENTS_HOST, LIVECOMMENTS_PORT). Default backend: 127.0.0.1:8080.
backend livecomments {
    .host = "127.0.0.1";
    .port = "8080";
    .connect_timeout = 2s;
    # A held long-poll sends its first byte when the hold ends: above the
    # longest hold (LIVECOMMENTS_MAX_WAIT, 30 s, plus the poller's margin).
    .first_byte_timeout = 45s;
    .between_bytes_timeout = 45s;
}

sub vcl_recv {
    # The builtin's rules first: Host in lower case (it is hashed), a Host
    # required in HTTP/1.1, writes (POST, DELETE) and CORS preflights passed.
    call vcl_req_host;
    call vcl_req_method;
    if (req.url ~ "^/(contents/[0-9]+/)?comments/stream(\?|$)") {
        # The event stream, of one feed or several (/comments/stream?feeds=):
        # one long response per viewer, never kept.
        return (pass);
    }
    if (req.url ~ "^/contents/[0-9]+/comments(\?|$)" || req.url ~ "^/comments(\?|$)") {
        # Feed reads are anonymous: a cookie or a token must not take a
        # viewer out of the shared answer (the builtin VCL would pass it).
        unset req.http.Cookie;
        unset req.http.Authorization;
        # One URL per cursor, whatever order a client puts its parameters in.
        # (The feeds inside /comments?feeds= are not sorted here: the service
        # answers a list in another order with a 307 to the canonical one,
        # which depends on the URL alone and is kept like any answer.)
        set req.url = std.querysort(req.url);
        if (!req.http.Accept || req.http.Accept == "*/*") {
            # Answers vary on Accept (JSON, or lines for text/plain): the
            # usual "no preference" forms are one copy, JSON, as the service
            # would answer them. Other values keep a copy of their own.
            set req.http.Accept = "application/json";
        }
        if (req.url ~ "[?&]wait=") {
            # The service ignores Prefer when the query names a wait: one copy
            # for every Prefer header instead of one per header (Vary: Prefer).
            unset req.http.Prefer;
        }
        return (hash);
    }
    # /healthz and everything else: to the service, never kept.
    return (pass);
}

sub vcl_backend_fetch {
    if (bereq.url ~ "^/(contents/[0-9]+/)?comments/stream(\?|$)") {
        # Events may be minutes apart; the stream sends heartbeats within this.
        set bereq.between_bytes_timeout = 120s;
    }
}

sub vcl_backend_response {
    if (bereq.uncacheable) {
        # Passed requests: streamed as they come (the event stream).
        set beresp.do_stream = true;
        return (deliver);
    }
    # A feed answer. An old one served while a fresh one is fetched would
    # hold back a change already made: no grace, no keep.
    set beresp.grace = 0s;
    set beresp.keep = 0s;
    if (beresp.ttl <= 0s || beresp.http.Cache-Control ~ "(?i)no-store|no-cache|private") {
        # Not for sharing (shed, reset, errors). The builtin VCL would make
        # the URL hit-for-miss for 120 s: every viewer of it sent to the
        # service on its own, a held request each. With a zero TTL the
        # viewers waiting for this fetch ask again one at a time, and
        # collapse again on the first fetch that is held.
        set beresp.ttl = 0s;
        set beresp.uncacheable = true;
        return (deliver);
    }
    if (beresp.http.Livecomments-Cache-Ms) {
        # A busy feed's answer asks its viewers to pause this long, and
        # they have moved on by then: kept no longer (not the whole
        # s-maxage), so a viewer still at its cursor gets everything since
        # in one answer instead of this page and then the next one.
        set beresp.ttl = std.duration(beresp.http.Livecomments-Cache-Ms + "ms", beresp.ttl);
        unset beresp.http.Livecomments-Cache-Ms;
    }
    return (deliver);
}

sub vcl_deliver {
    # For operators and tests: was this answer shared?
    if (obj.uncacheable) {
        set resp.http.X-Cache = "pass";
    } elsif (obj.hits > 0) {
        set resp.http.X-Cache = "hit";
    } else {
        set resp.http.X-Cache = "miss";
    }
}
