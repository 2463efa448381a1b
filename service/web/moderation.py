"""The moderation routes: a content's bans and its room.

Every write is a moderator's (a user's token: 403 ``forbidden``; none:
401) and a change of the content's feed at a new seq, made by the store in
one transaction (:mod:`service.db.moderation`); the resource then wakes
this process's feed and waits until it shows the change, as a comment's
post does, so the viewers held here are answered within one hold cycle
(other processes hear the NOTIFY). Nothing here is ever kept by a cache:
``Cache-Control: no-store`` on every answer, the room's GET included (the
feed's pages carry the room for viewers behind a cache).
"""

from __future__ import annotations

import falcon

from ..common.errors import ErrorCode
from ..db.moderation import InvalidPin
from .parsing import parse_ban, parse_id, parse_room_patch
from .resources import announce, authenticate


def moderator(req, signer):
    """The request's moderator :class:`~service.web.auth.Principal`: 401
    without a usable token, 403 for a token that is not a moderator's."""
    principal = authenticate(req, signer)
    if not principal.is_moderator:
        raise falcon.HTTPForbidden(
            title="Moderators only",
            description="only a moderator's token may moderate a content",
            code=ErrorCode.FORBIDDEN,
        )
    return principal


class _ModerationResource:
    def __init__(self, feeds, settings, *, store, signer):
        self._feeds = feeds
        self._settings = settings
        self._store = store
        self._signer = signer


class BansResource(_ModerationResource):
    """``/contents/{content_id}/bans``: ban an author (POST), list the bans in force (GET)."""

    def on_post(self, req, resp, content_id):
        content_id = parse_id(content_id, "content_id")
        principal = moderator(req, self._signer)
        request = parse_ban(req, self._settings)
        if request.author_id == principal.author_id:
            raise falcon.HTTPBadRequest(
                title="Invalid ban",
                description="a moderator cannot ban themself",
                code=ErrorCode.INVALID_REQUEST,
            )
        ban = self._store.ban(
            content_id, request.author_id, seconds=request.seconds, retract=request.retract,
            reason=request.reason, moderator_id=principal.author_id,
        )
        announce(self._feeds, content_id, ban.seq)
        resp.status = falcon.HTTP_201
        resp.cache_control = ["no-store"]
        resp.location = f"/contents/{content_id}/bans/{request.author_id}"
        resp.media = ban.to_json()

    def on_get(self, req, resp, content_id):
        content_id = parse_id(content_id, "content_id")
        moderator(req, self._signer)
        bans = self._store.bans(content_id)
        resp.cache_control = ["no-store"]
        resp.media = {"content_id": content_id, "bans": [ban.to_json() for ban in bans]}


class BanResource(_ModerationResource):
    """``/contents/{content_id}/bans/{author_id}``: lift a ban (DELETE)."""

    def on_delete(self, req, resp, content_id, author_id):
        content_id = parse_id(content_id, "content_id")
        author_id = parse_id(author_id, "author_id")
        principal = moderator(req, self._signer)
        event = self._store.lift_ban(content_id, author_id, principal.author_id)
        if event is None:
            raise falcon.HTTPNotFound(
                title="No such ban",
                description=f"author {author_id} has no ban in force on content {content_id}",
                code=ErrorCode.NOT_FOUND,
            )
        announce(self._feeds, content_id, event.seq)
        resp.status = falcon.HTTP_204
        resp.cache_control = ["no-store"]


class RoomResource(_ModerationResource):
    """``/contents/{content_id}/room``: read the room (GET, anyone), change it (PATCH)."""

    def on_get(self, req, resp, content_id):
        content_id = parse_id(content_id, "content_id")
        room = self._store.room(content_id)
        resp.cache_control = ["no-store"]
        resp.media = room.to_json()

    def on_patch(self, req, resp, content_id):
        content_id = parse_id(content_id, "content_id")
        principal = moderator(req, self._signer)
        changes = parse_room_patch(req, self._settings)
        try:
            room, event = self._store.set_room(content_id, principal.author_id, **changes)
        except InvalidPin as exc:
            pinned = changes["pinned_comment_id"]
            if exc.reason == "deleted":
                title, description = "Comment deleted", f"comment {pinned} was deleted"
            else:
                title = "No such comment"
                description = f"content {content_id} has no comment {pinned}"
            raise falcon.HTTPBadRequest(
                title=title, description=f"{description}: it cannot be pinned",
                code=ErrorCode.INVALID_REQUEST,
            ) from None
        if event is not None:
            announce(self._feeds, content_id, event.seq)
        resp.cache_control = ["no-store"]
        resp.media = room.to_json()
