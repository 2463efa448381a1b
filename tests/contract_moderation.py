"""Contract cases for moderation, used by test_contract.py.

The bans and the room, each as ``@case`` producers collected in
:data:`CASES`; the posts moderation refuses (403 ``banned``, 409 ``closed``
and ``duplicate``, 429 ``slow_mode``), produced by the ``*_posts``
functions for test_contract's POST cases; and the feed pages of a
moderated content (events beside the comments, the room, a closed
content's pause), produced by :func:`moderated_pages` for its feed cases.

A refusal that only the database can tell (a moderator banning themself,
pinning a comment that is missing, another content's or deleted) is
marked :func:`unjudged`: the document accepts its request, rightly.
"""

from __future__ import annotations

import json

import jsonschema

from service.web.openapi import load_spec

CASES = {}

BANS = "/contents/{content_id}/bans"
BAN = "/contents/{content_id}/bans/{author_id}"
ROOM = "/contents/{content_id}/room"
FEED = "/contents/{content_id}/comments"
#: The moderator of every case, and the authors it acts on.
MODERATOR = 99
#: The content the moderated-feed pages are read from.
MODERATED = 3
DEFAULT_ROOM = {"closed": False, "slow_mode_seconds": 0, "pinned": None}

_SPEC = load_spec()


def case(method, path, status):
    """Register how to produce ``status`` from ``method path`` (as test_contract's)."""

    def register(produce):
        CASES[method, path, status] = produce
        return produce

    return register


def schema(name):
    """A validator of the document's component schema ``name``."""
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": _SPEC["components"]},
        format_checker=jsonschema.FormatChecker())


def unjudged(resp):
    """Mark a refusal whose request the document cannot judge (the
    database's say): test_contract validates its answer, not its request."""
    resp.contract_unjudged = True
    return resp


# -- requests ---------------------------------------------------------------------


def auth(env, author=MODERATOR, role="moderator"):
    return {"Authorization": env.token(author, role)}


def ban(env, client, body, content_id=1, headers=None):
    """POST a ban document (a dict, or raw bytes) as the moderator, or with ``headers``."""
    headers = auth(env) if headers is None else headers
    path = f"/contents/{content_id}/bans"
    if isinstance(body, bytes):
        return client.post(path, body, content_type="application/json", headers=headers,
                           expect_errors=True)
    return client.post_json(path, body, headers=headers, expect_errors=True)


def bans(env, client, content_id=1, headers=None, **params):
    return client.get(f"/contents/{content_id}/bans", params=params,
                      headers=auth(env) if headers is None else headers, expect_errors=True)


def lift(env, client, author_id, content_id=1, headers=None):
    return client.delete(f"/contents/{content_id}/bans/{author_id}",
                         headers=auth(env) if headers is None else headers, expect_errors=True)


def room(client, content_id=1, **params):
    return client.get(f"/contents/{content_id}/room", params=params, expect_errors=True)


def patch_room(env, client, body, content_id=1, headers=None):
    headers = auth(env) if headers is None else headers
    path = f"/contents/{content_id}/room"
    if isinstance(body, bytes):
        return client.patch(path, body, content_type="application/json", headers=headers,
                            expect_errors=True)
    return client.patch_json(path, body, headers=headers, expect_errors=True)


def no_store(*answers):
    for answer in answers:
        assert answer.headers["Cache-Control"] == "no-store", answer


# -- the feed of a moderated content ------------------------------------------------


def moderated_pages(env, read):
    """Feed pages of content :data:`MODERATED` with every kind of event:
    a pin, slow mode, a retracting ban (tombstones, an unpin, the ban), a
    lift, a deletion unpinning, a closing; ``read(client, content_id,
    headers=None, **params)`` reads a content's feed. Checks the changes
    come in seq order, the room of each page is its cursor's, and a closed
    content's pages ask for the long pause."""
    c = MODERATED
    pinned = env.post(env.live, "pin me", author=5, content_id=c).json
    doomed = [env.post(env.live, f"spam {n}", author=6, content_id=c).json for n in (1, 2)]
    assert patch_room(env, env.live, {"pinned_comment_id": doomed[0]["id"]},
                      content_id=c).status_int == 200
    assert patch_room(env, env.live, {"slow_mode_seconds": 30}, content_id=c).status_int == 200
    banned = ban(env, env.live, {"author_id": 6, "retract": True, "reason": "spam"},
                 content_id=c)
    assert banned.status_int == 201 and banned.json["retracted"] == 2, banned
    assert lift(env, env.live, 6, content_id=c).status_int == 204
    assert patch_room(env, env.live, {"pinned_comment_id": pinned["id"]},
                      content_id=c).status_int == 200
    env.delete(env.live, f"/contents/{c}/comments/{pinned['id']}", author=5)  # unpins
    history = read(env.live, c, since=0, wait=0)
    changes = sorted(history.json["comments"] + history.json["events"], key=lambda x: x["seq"])
    assert len({x["seq"] for x in changes}) == len(changes)
    kinds = [x.get("type", "deleted" if x.get("deleted") else "comment") for x in changes]
    # The retraction's tombstones come before its ban, the lift after; the
    # pinned comment's deletion unpinned it (a room event of no moderator's).
    # (Older room events may be left out: a room event replaces the one before.)
    assert [k for k in kinds if k != "room"] == ["deleted", "deleted", "ban", "unban",
                                                 "deleted"], kinds
    assert kinds[-1] == "room" and changes[-1]["room"]["pinned"] is None, changes[-1]
    assert changes[-1]["moderator_id"] is None
    assert next(x for x in changes if x.get("type") == "ban")["retracted"] == 2
    assert history.json["room"] == {"closed": False, "slow_mode_seconds": 30, "pinned": None}
    pages = [history, read(env.live, c, since=0, wait=0, limit=2),
             read(env.live, c)]  # latest: live comments only, and the room
    assert pages[2].json["events"] == [] and pages[2].json["comments"] == []
    assert pages[2].json["room"] == history.json["room"]
    pages.append(read(env.live, c, since=0, wait=0, format="lines"))
    lines = pages[-1].text.splitlines()
    assert lines[0].endswith(" closed 0 slow_mode 30 pinned 0"), lines[0]
    assert [line.split("\t")[1] for line in lines[1:] if not line.split("\t")[1].isdigit()] == [
        k for k in kinds if k in ("room", "ban", "unban")], lines
    assert patch_room(env, env.live, {"closed": True}, content_id=c).status_int == 200
    closed = [read(env.live, c), read(env.live, c, since=0, wait=0, format="lines"),
              read(env.live, c, since=pages[0].json["cursor"], wait=0)]
    for page in closed:
        assert page.status_int == 200
    closed_ms = env.live.app.settings.closed_poll_after_ms
    assert closed[0].json["room"]["closed"] is True
    assert closed[0].json["poll_after_ms"] == closed_ms
    assert closed[1].text.startswith("cursor ") and f" poll_after_ms {closed_ms} " in (
        closed[1].text.splitlines()[0]) and " closed 1 " in closed[1].text.splitlines()[0]
    assert [e["type"] for e in closed[2].json["events"]] == ["room"]
    return pages + closed


# -- the posts moderation refuses ---------------------------------------------------


def banned_posts(env):
    """403 ``banned``: a timed ban (``until``, ``Retry-After``) and one for good."""
    env.post(env.live, "before the ban", author=7)
    assert ban(env, env.live, {"author_id": 7, "seconds": 600}).status_int == 201
    assert ban(env, env.live, {"author_id": 8, "seconds": None}).status_int == 201
    timed = env.post(env.live, "let me in", author=7, expect_errors=True)
    for_good = env.post(env.live, "let me in", author=8, expect_errors=True)
    elsewhere = env.post(env.live, "bans are per content", author=8, content_id=2)
    assert elsewhere.status_int == 201
    assert timed.json["code"] == for_good.json["code"] == "banned"
    assert timed.json["until"] is not None and 590 <= int(timed.headers["Retry-After"]) <= 600
    assert for_good.json["until"] is None and "Retry-After" not in for_good.headers
    return [timed, for_good]


def conflicting_posts(env):
    """409 ``closed`` and ``duplicate``; a replay is not a duplicate."""
    key = {"Idempotency-Key": "contract-duplicate"}
    first = env.post(env.live, "same again", author=2, headers=key)
    replay = env.post(env.live, "same again", author=2, headers=key)
    assert replay.status_int == 201 and replay.headers["Idempotent-Replayed"] == "true"
    duplicate = env.post(env.live, "same again", author=2, expect_errors=True)
    assert env.post(env.live, "same again", author=3).status_int == 201  # another author
    assert env.post(env.live, "same again", author=2, content_id=2).status_int == 201
    assert first.status_int == 201 and duplicate.json["code"] == "duplicate"
    assert patch_room(env, env.live, {"closed": True}, content_id=4).status_int == 200
    closed = [env.post(env.live, "too late", author=2, content_id=4, expect_errors=True),
              env.post(env.live, "too late", author=MODERATOR, content_id=4,
                       expect_errors=True)]
    assert {answer.json["code"] for answer in closed} == {"closed"}
    return [duplicate, *closed]


def slow_posts(env):
    """429 ``slow_mode``, with ``Retry-After``; moderators are exempt."""
    assert patch_room(env, env.live, {"slow_mode_seconds": 30}, content_id=5).status_int == 200
    assert env.post(env.live, "one", author=2, content_id=5).status_int == 201
    slow = env.post(env.live, "two", author=2, content_id=5, expect_errors=True)
    assert slow.json["code"] == "slow_mode" and 1 <= int(slow.headers["Retry-After"]) <= 30
    for body in ("moderators", "are exempt"):
        resp = env.client().post_json("/contents/5/comments", {"body": body},
                                      headers=auth(env))
        assert resp.status_int == 201
    return slow


# -- bans -------------------------------------------------------------------------


@case("POST", BANS, 201)
def _(env):
    env.post(env.live, "to be retracted", author=3)
    env.post(env.live, "this one too", author=3)
    timed = ban(env, env.live, {"author_id": 2, "seconds": 600, "reason": "cool down"})
    retracting = ban(env, env.live, {"author_id": 3, "retract": True, "seconds": None})
    again = ban(env, env.live, {"author_id": 2, "seconds": None, "retract": False,
                                "reason": None})  # replaces the first
    no_comments = ban(env, env.live, {"author_id": 4}, content_id=987654)
    answers = [timed, retracting, again, no_comments]
    for answer in answers:
        assert answer.status_int == 201, answer
        assert answer.headers["Location"] == (
            f"/contents/{answer.json['content_id']}/bans/{answer.json['author_id']}")
    no_store(*answers)
    assert timed.json["until"] is not None and timed.json["reason"] == "cool down"
    assert timed.json["moderator_id"] == MODERATOR and timed.json["retracted"] == 0
    assert retracting.json["retracted"] == 2 and retracting.json["until"] is None
    assert again.json["until"] is None and again.json["reason"] is None
    assert [b["author_id"] for b in bans(env, env.live).json["bans"]] == [2, 3]
    return answers


@case("POST", BANS, 400)
def _(env):
    moderator_bans_self = unjudged(ban(env, env.live, {"author_id": MODERATOR}))
    refused = [
        ban(env, env.live, {}),
        ban(env, env.live, {"author_id": 0}),
        ban(env, env.live, {"author_id": "7"}),
        ban(env, env.live, {"author_id": 2**63}),
        ban(env, env.live, {"author_id": 7, "seconds": 0}),
        ban(env, env.live, {"author_id": 7, "seconds": 31_536_001}),
        ban(env, env.live, {"author_id": 7, "seconds": 1.5}),
        ban(env, env.live, {"author_id": 7, "seconds": "60"}),
        ban(env, env.live, {"author_id": 7, "retract": "yes"}),
        ban(env, env.live, {"author_id": 7, "reason": "x" * 201}),
        ban(env, env.live, {"author_id": 7, "until": None}),
        ban(env, env.live, [7]),
        ban(env, env.live, b'{"author_id": 7'),
        ban(env, env.live, {"author_id": 7}, content_id=0),
        moderator_bans_self,
    ]
    assert {answer.json["code"] for answer in refused} == {"invalid_request"}
    no_store(*refused)
    assert bans(env, env.live).json["bans"] == []  # nothing was changed
    return refused


@case("POST", BANS, 401)
def _(env):
    return [ban(env, env.live, {"author_id": 7}, headers={}),
            ban(env, env.live, {"author_id": 7}, headers={"Authorization": "Bearer forged"})]


@case("POST", BANS, 403)
def _(env):
    refused = ban(env, env.live, {"author_id": 7}, headers=auth(env, 1, "user"))
    assert refused.json["code"] == "forbidden"
    return refused


@case("POST", BANS, 413)
def _(env):
    return ban(env, env.live, {"author_id": 7, "reason": "x" * 70_000})


@case("POST", BANS, 415)
def _(env):
    return env.live.post("/contents/1/bans", b"author_id=7", content_type="text/plain",
                         headers=auth(env), expect_errors=True)


@case("POST", BANS, 503)
def _(env):
    return ban(env, env.dead, {"author_id": 7})


@case("GET", BANS, 200)
def _(env):
    empty = bans(env, env.live)
    assert empty.json == {"content_id": 1, "bans": []}
    for author_id in (9, 4, 6):
        assert ban(env, env.live, {"author_id": author_id, "seconds": 600}).status_int == 201
    assert lift(env, env.live, 6).status_int == 204
    listed = bans(env, env.live)
    assert [b["author_id"] for b in listed.json["bans"]] == [4, 9]
    no_store(empty, listed)
    return [empty, listed]


@case("GET", BANS, 400)
def _(env):
    return [bans(env, env.live, content_id=0), bans(env, env.live, callback="cb")]


@case("GET", BANS, 401)
def _(env):
    return [bans(env, env.live, headers={}),
            bans(env, env.live, headers={"Authorization": "Bearer forged"})]


@case("GET", BANS, 403)
def _(env):
    return bans(env, env.live, headers=auth(env, 1, "user"))


@case("GET", BANS, 503)
def _(env):
    return bans(env, env.dead)


@case("DELETE", BAN, 204)
def _(env):
    assert ban(env, env.live, {"author_id": 7}).status_int == 201
    lifted = lift(env, env.live, 7)
    assert env.post(env.live, "back", author=7).status_int == 201
    no_store(lifted)
    return lifted


@case("DELETE", BAN, 400)
def _(env):
    return [lift(env, env.live, "abc"), lift(env, env.live, 0),
            lift(env, env.live, 7, content_id="x")]


@case("DELETE", BAN, 401)
def _(env):
    return [lift(env, env.live, 7, headers={}),
            lift(env, env.live, 7, headers={"Authorization": "Bearer forged"})]


@case("DELETE", BAN, 403)
def _(env):
    assert ban(env, env.live, {"author_id": 7}).status_int == 201
    return lift(env, env.live, 7, headers=auth(env, 7, "user"))


@case("DELETE", BAN, 404)
def _(env):
    never = lift(env, env.live, 7)
    assert ban(env, env.live, {"author_id": 8}).status_int == 201
    assert lift(env, env.live, 8).status_int == 204
    twice = lift(env, env.live, 8)
    for answer in (never, twice):
        assert answer.json["code"] == "not_found"
    return [never, twice]


@case("DELETE", BAN, 503)
def _(env):
    return lift(env, env.dead, 7)


# -- the room ---------------------------------------------------------------------


@case("GET", ROOM, 200)
def _(env):
    default = room(env.live)
    assert default.json == DEFAULT_ROOM
    comment = env.post(env.live, "pinned").json
    assert patch_room(env, env.live, {"pinned_comment_id": comment["id"], "closed": True,
                                      "slow_mode_seconds": 5}).status_int == 200
    moderated = room(env.live)
    assert moderated.json == {"closed": True, "slow_mode_seconds": 5, "pinned": comment}
    no_store(default, moderated)
    cached = env.client(shared_cache_seconds=1)  # never stored, even behind a cache
    shared = room(cached)
    no_store(shared)
    return [default, moderated, shared]


@case("GET", ROOM, 400)
def _(env):
    return [room(env.live, content_id="abc"), room(env.live, content_id=0),
            room(env.live, callback="cb")]


@case("GET", ROOM, 503)
def _(env):
    return room(env.dead)


@case("PATCH", ROOM, 200)
def _(env):
    comment = env.post(env.live, "pin me").json
    reply = env.post(env.live, "a reply", author=2, parent_id=comment["id"]).json

    def cursor():
        return env.live.get("/contents/1/comments", params={"since": 0, "wait": 0}).json[
            "cursor"]

    answers = [
        patch_room(env, env.live, {"slow_mode_seconds": 10}),
        patch_room(env, env.live, {"pinned_comment_id": reply["id"]}),
        patch_room(env, env.live, {"closed": True, "slow_mode_seconds": 0}),
    ]
    before = cursor()
    answers.append(patch_room(env, env.live, {"closed": True}))  # no change
    assert cursor() == before  # is no change of the feed
    answers.append(patch_room(env, env.live, {"closed": False, "pinned_comment_id": None}))
    assert [a.json for a in answers] == [
        {"closed": False, "slow_mode_seconds": 10, "pinned": None},
        {"closed": False, "slow_mode_seconds": 10, "pinned": reply},
        {"closed": True, "slow_mode_seconds": 0, "pinned": reply},
        {"closed": True, "slow_mode_seconds": 0, "pinned": reply},
        DEFAULT_ROOM,
    ]
    no_store(*answers)
    assert cursor() == before + 1
    return answers


@case("PATCH", ROOM, 400)
def _(env):
    comment = env.post(env.live, "mine").json
    deleted = env.post(env.live, "deleted").json
    env.delete(env.live, f"/contents/1/comments/{deleted['id']}", author=1)
    elsewhere = env.post(env.live, "another content's", content_id=2).json
    refused = [
        patch_room(env, env.live, {}),
        patch_room(env, env.live, {"slow_mode": 10}),
        patch_room(env, env.live, {"slow_mode_seconds": 601}),
        patch_room(env, env.live, {"slow_mode_seconds": -1}),
        patch_room(env, env.live, {"slow_mode_seconds": "30"}),
        patch_room(env, env.live, {"slow_mode_seconds": 1.5}),
        patch_room(env, env.live, {"closed": "yes"}),
        patch_room(env, env.live, {"closed": None}),
        patch_room(env, env.live, {"pinned_comment_id": 0}),
        patch_room(env, env.live, {"pinned_comment_id": str(comment["id"])}),
        patch_room(env, env.live, {"closed": True, "pinned": None}),
        patch_room(env, env.live, [True]),
        patch_room(env, env.live, b'{"closed": true'),
        patch_room(env, env.live, {"closed": True}, content_id=0),
        unjudged(patch_room(env, env.live, {"pinned_comment_id": 987654321})),
        unjudged(patch_room(env, env.live, {"pinned_comment_id": elsewhere["id"]})),
        unjudged(patch_room(env, env.live, {"pinned_comment_id": deleted["id"]})),
    ]
    assert {answer.json["code"] for answer in refused} == {"invalid_request"}
    no_store(*refused)
    assert room(env.live).json == DEFAULT_ROOM  # nothing was changed
    return refused


@case("PATCH", ROOM, 401)
def _(env):
    return [patch_room(env, env.live, {"closed": True}, headers={}),
            patch_room(env, env.live, {"closed": True},
                       headers={"Authorization": "Bearer forged"})]


@case("PATCH", ROOM, 403)
def _(env):
    refused = patch_room(env, env.live, {"closed": True}, headers=auth(env, 1, "user"))
    assert refused.json["code"] == "forbidden"
    assert room(env.live).json == DEFAULT_ROOM
    return refused


@case("PATCH", ROOM, 413)
def _(env):
    return patch_room(env, env.live, {"closed": True, "pad": "x" * 70_000})


@case("PATCH", ROOM, 415)
def _(env):
    return env.live.patch("/contents/1/room", b"closed=1", content_type="text/plain",
                          headers=auth(env), expect_errors=True)


@case("PATCH", ROOM, 503)
def _(env):
    return patch_room(env, env.dead, {"closed": True})


# -- the stream's moderation events -----------------------------------------------------


#: Each named event's ``data`` (``message``: a comment or tombstone).
EVENT_DATA = {"message": "Comment", "reset": "FeedPage", "room": "Room", "closed": "Room",
              "ban": "Event", "unban": "Event"}


def stream_events(text):
    """``(type, fields)`` of each event in an event stream's body, in the
    order sent: the type is the one ``EventSource`` dispatches (the
    ``event:`` field, else ``message``); blocks without data (comments,
    a ``retry:``) are no events."""
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n")
                      if line and not line.startswith(":"))
        if "data" in fields:
            yield fields.get("event", "message"), fields


def event_data_errors(text, event_data=EVENT_DATA):
    """What in an event stream's events' ``data`` breaks the document (the
    ``EventStream`` pattern only sees their lines); ``event_data`` names
    each event's schema (a stream of several feeds has its own)."""
    validators = {kind: schema(name) for kind, name in event_data.items()}
    errors = []
    for kind, fields in stream_events(text):
        if kind == "keepalive":
            if fields["data"] != fields["id"]:
                errors.append(f"keepalive: data {fields['data']} is not its id {fields['id']}")
            continue
        validator = validators.get(kind)
        if validator is None:
            errors.append(f"an event the document does not name: {kind}")
            continue
        errors += [f"{kind} event: {e.message}"
                   for e in validator.iter_errors(json.loads(fields["data"]))]
    return errors
