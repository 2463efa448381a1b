vcl 4.1;

# livecomments behind Varnish (7.x): the viewers held at one feed URL are one
# held request upstream, and its answer is theirs. Run the service with
# LIVECOMMENTS_SHARED_CACHE_SECONDS=1 (or 2): with it at 0 every feed answer
# is no-store, and the viewers waiting for one URL would be passed to the
# service one hold after another. See deploy/README.md.

import directors;
import std;

# The service hosts (LIVECOMMENTS_HOST, LIVECOMMENTS_PORT): one backend block
# each, all probed alike and added to the director in vcl_init. The defaults,
# two processes on this machine: 127.0.0.1:8080 and 127.0.0.1:8081. The
# timeouts are set per fetch, for every host, in vcl_backend_fetch.
probe healthz {
    # /healthz answers 503 while a process drains (SIGTERM), while its
    # database does not answer or while its pollers are stuck: 2 failed
    # probes of the last 3, a second apart, take a host out; 2 good ones of
    # the last 3 put it back.
    .url = "/healthz";
    .interval = 1s;
    .timeout = 2s;
    .window = 3;
    .threshold = 2;
}

backend host1 {
    .host = "127.0.0.1";
    .port = "8080";
    .probe = healthz;
}

backend host2 {
    .host = "127.0.0.1";
    .port = "8081";
    .probe = healthz;
}

sub vcl_init {
    # Consistent hashing (vcl_backend_fetch picks the key): a feed URL's
    # fetches go to one host, and a retry to the next host on the ring.
    new hosts = directors.shard();
    hosts.add_backend(host1);
    hosts.add_backend(host2);
    hosts.reconfigure();
}

sub vcl_recv {
    if (req.method == "POST" && req.http.Idempotency-Key) {
        # A keyed write may be sent again, to another host, if its host
        # fails (vcl_backend_error): the service answers a repeat of its key
        # with the first answer. Its body is kept for that; the service takes
        # no more than 64 KB (LIVECOMMENTS_MAX_BODY_BYTES).
        if (!std.cache_req_body(64KB)) {
            return (synth(413, "Request body too large"));
        }
    }
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
    set bereq.connect_timeout = 2s;
    # A held long-poll sends its first byte when the hold ends: above the
    # longest hold (LIVECOMMENTS_MAX_WAIT, 30 s, plus the poller's margin).
    set bereq.first_byte_timeout = 45s;
    set bereq.between_bytes_timeout = 45s;
    if (bereq.url ~ "^/(contents/[0-9]+/)?comments/stream(\?|$)") {
        # Events may be minutes apart; the stream sends heartbeats within this.
        set bereq.between_bytes_timeout = 120s;
    }
    # The host: by the URL (every fetch of a feed URL on one host, from every
    # cache in front of it), a keyed write by its key (writes spread). A
    # retry takes the next host on the ring (alt); hosts the probe found
    # sick are skipped (healthy=ALL).
    if (bereq.http.Idempotency-Key) {
        set bereq.backend = hosts.backend(by=KEY, key=hosts.key(bereq.http.Idempotency-Key),
                                          alt=bereq.retries, healthy=ALL);
    } else {
        set bereq.backend = hosts.backend(by=URL, alt=bereq.retries, healthy=ALL);
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

sub vcl_backend_error {
    # No answer from the host: refused, reset (killed mid-hold), timed out,
    # or no healthy host. Reads, and writes with an Idempotency-Key (the
    # service answers a repeat with the first answer, never a second
    # comment), are sent again to the next host, at most twice. A write
    # without a key is not: its host may have taken it before failing.
    if (bereq.retries < 2
        && (bereq.method == "GET" || bereq.method == "HEAD"
            || (bereq.method == "POST" && bereq.http.Idempotency-Key))) {
        return (retry);
    }
    # Varnish's own 503, in the service's error format, never kept: the
    # client may try again in a second (a write with the same key).
    set beresp.status = 503;
    set beresp.ttl = 0s;
    set beresp.http.Retry-After = "1";
    set beresp.http.Cache-Control = "no-store";
    set beresp.http.Content-Type = "application/json";
    synthetic({"{"title": "Service Unavailable", "description": "no service host answered; try again", "code": "unavailable" }"});
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
