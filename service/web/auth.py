"""Bearer tokens: HMAC-SHA256-signed author id, role and expiry.

A token is ``<payload>.<signature>``, both base64url without padding; the
payload is compact JSON ``{"sub": author_id, "role": role, "exp": unix}``.
Verification compares signatures in constant time and checks the signature
before it trusts a byte of the payload.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

ROLES = ("user", "moderator")

#: Verified tokens remembered per signer, so a writer's next post skips
#: the HMAC and JSON (a twentieth of a post's CPU). Expiry is still checked
#: on every use; a forged or malformed token is never remembered.
VERIFIED_TOKENS = 4096


class InvalidToken(Exception):
    """The token is malformed, forged or expired."""


@dataclass(frozen=True, slots=True)
class Principal:
    author_id: int
    role: str

    @property
    def is_moderator(self):
        return self.role == "moderator"

    def may_delete(self, comment):
        return self.is_moderator or comment.author_id == self.author_id


class TokenSigner:
    def __init__(self, secret, *, clock=time.time):
        self._key = secret.encode()
        self._clock = clock
        self._checked = functools.lru_cache(maxsize=VERIFIED_TOKENS)(self._check)

    def mint(self, author_id, role="user", ttl=86400):
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if author_id < 1 or ttl < 1:
            raise ValueError("author_id and ttl must be positive")
        claims = {"sub": author_id, "role": role, "exp": int(self._clock()) + int(ttl)}
        payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}"

    def verify(self, token):
        """Return the token's :class:`Principal`, or raise :class:`InvalidToken`."""
        principal, expires = self._checked(token)
        if expires <= self._clock():
            raise InvalidToken("token expired")
        return principal

    def _check(self, token):
        """The signed claims as (Principal, expiry); raises :class:`InvalidToken`."""
        payload, dot, signature = token.partition(".")
        # Tokens are base64url: anything else is malformed (and
        # compare_digest refuses non-ASCII strings with a TypeError).
        if not dot or not payload or not signature or not token.isascii():
            raise InvalidToken("malformed token")
        if not hmac.compare_digest(self._sign(payload), signature):
            raise InvalidToken("bad signature")
        try:
            claims = json.loads(_b64decode(payload))
            author_id, role, expires = claims["sub"], claims["role"], claims["exp"]
        except (ValueError, KeyError, TypeError):
            raise InvalidToken("malformed token") from None
        if type(author_id) is not int or author_id < 1 or role not in ROLES:
            raise InvalidToken("malformed token")
        if not isinstance(expires, int):
            raise InvalidToken("malformed token")
        return Principal(author_id, role), expires

    def _sign(self, payload):
        return _b64encode(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())


def _b64encode(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
