"""Bearer tokens: what is accepted, and everything forged or broken that is not."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime

import pytest

from service.db.store import Comment
from service.web.auth import InvalidToken, Principal, TokenSigner

SECRET = "test-secret-0123456789abcdef"
NOW = 1_800_000_000


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload_text, secret=SECRET):
    """A token whose payload is ``payload_text`` (already base64url), correctly signed."""
    signature = b64(hmac.new(secret.encode(), payload_text.encode(), hashlib.sha256).digest())
    return f"{payload_text}.{signature}"


def signed_claims(claims, secret=SECRET):
    return signed(b64(json.dumps(claims).encode()), secret)


class Clock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def signer(clock):
    return TokenSigner(SECRET, clock=clock)


@pytest.mark.parametrize("role", ["user", "moderator"])
def test_round_trip(signer, role):
    """A minted token verifies to the same author and role."""
    principal = signer.verify(signer.mint(42, role))
    assert principal == Principal(42, role)
    assert principal.is_moderator is (role == "moderator")


def test_default_role_is_user(signer):
    assert signer.verify(signer.mint(3)).role == "user"


def test_token_is_payload_dot_signature(signer):
    """The token carries sub, role and exp as compact JSON, readable by other tools."""
    token = signer.mint(7, "moderator", ttl=60)
    payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims == {"sub": 7, "role": "moderator", "exp": NOW + 60}
    assert "=" not in token
    assert signed(payload) == token


def test_hand_made_token_with_the_secret_is_accepted(signer):
    """Another service holding the secret can issue tokens this one accepts."""
    token = signed_claims({"sub": 9, "role": "user", "exp": NOW + 10})
    assert signer.verify(token) == Principal(9, "user")


def flip(char):
    return "A" if char != "A" else "B"


@pytest.mark.parametrize("position", [0, 10, -1])
def test_flipped_signature_character_refused(signer, position):
    """Changing any character of the signature makes the token worthless."""
    token = signer.mint(1)
    payload, signature = token.split(".")
    chars = list(signature)
    chars[position] = flip(chars[position])
    with pytest.raises(InvalidToken):
        signer.verify(f"{payload}.{''.join(chars)}")


def test_token_signed_with_another_secret_refused(signer, clock):
    """A token from another deployment (another secret) is refused."""
    other = TokenSigner("another-secret-0123456789", clock=clock)
    with pytest.raises(InvalidToken):
        signer.verify(other.mint(1, "moderator"))


def test_tampered_payload_refused(signer):
    """Raising one's own author id or role in the payload keeps the old signature: refused."""
    token = signer.mint(1, "user")
    _, signature = token.split(".")
    for claims in (
        {"sub": 2, "role": "user", "exp": NOW + 86400},
        {"sub": 1, "role": "moderator", "exp": NOW + 86400},
        {"sub": 1, "role": "user", "exp": NOW + 10**9},
    ):
        payload = b64(json.dumps(claims, separators=(",", ":")).encode())
        with pytest.raises(InvalidToken):
            signer.verify(f"{payload}.{signature}")


def test_expired_token_refused(signer, clock):
    """A token works until its expiry second and not from then on."""
    token = signer.mint(5, ttl=60)
    clock.now = NOW + 59
    assert signer.verify(token).author_id == 5
    clock.now = NOW + 60
    with pytest.raises(InvalidToken, match="expired"):
        signer.verify(token)
    clock.now = NOW + 10**6
    with pytest.raises(InvalidToken, match="expired"):
        signer.verify(token)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        ".",
        "abc.",
        ".abc",
        "a.b.c",
        "abc.\u00e9",
        "\u00e9\u00e9.abc",
        "Bearer abc.def",
        "not base64!.??",
    ],
)
def test_malformed_strings_refused(signer, token):
    """Garbage in the Authorization header is refused as an invalid token, never a crash."""
    with pytest.raises(InvalidToken):
        signer.verify(token)


def test_three_part_token_with_valid_first_parts_refused(signer):
    """Appending anything to a good token breaks it."""
    with pytest.raises(InvalidToken):
        signer.verify(signer.mint(1) + ".extra")


@pytest.mark.parametrize(
    "payload",
    [
        "!!!!",  # no base64 characters at all
        "a",  # impossible base64 length
        b64(b"\xff\xfe\x00"),  # not UTF-8
        b64(b"not json"),
        b64(b"[1, 2, 3]"),
        b64(b"42"),
        b64(b"null"),
    ],
)
def test_correctly_signed_garbage_payload_refused(signer, payload):
    """Even a correctly signed payload must be the expected JSON object."""
    with pytest.raises(InvalidToken):
        signer.verify(signed(payload))


@pytest.mark.parametrize(
    "claims",
    [
        {"role": "user", "exp": NOW + 60},
        {"sub": 1, "exp": NOW + 60},
        {"sub": 1, "role": "user"},
        {"sub": "1", "role": "user", "exp": NOW + 60},
        {"sub": True, "role": "user", "exp": NOW + 60},
        {"sub": 1.0, "role": "user", "exp": NOW + 60},
        {"sub": 0, "role": "user", "exp": NOW + 60},
        {"sub": -3, "role": "user", "exp": NOW + 60},
        {"sub": None, "role": "user", "exp": NOW + 60},
        {"sub": 1, "role": "admin", "exp": NOW + 60},
        {"sub": 1, "role": ["moderator"], "exp": NOW + 60},
        {"sub": 1, "role": "user", "exp": "9999999999"},
        {"sub": 1, "role": "user", "exp": float(NOW + 60)},
    ],
)
def test_signed_payload_with_bad_fields_refused(signer, claims):
    """Missing fields, string or boolean author ids, unknown roles: all refused."""
    with pytest.raises(InvalidToken):
        signer.verify(signed_claims(claims))


@pytest.mark.parametrize(
    ("author_id", "role", "ttl"), [(0, "user", 60), (-1, "user", 60), (1, "admin", 60), (1, "user", 0)]
)
def test_mint_refuses_bad_arguments(signer, author_id, role, ttl):
    with pytest.raises(ValueError):
        signer.mint(author_id, role, ttl)


def comment_by(author_id):
    return Comment(
        id=1, content_id=1, author_id=author_id, body="x",
        created_at=datetime(2026, 1, 1, tzinfo=UTC), seq=1, deleted=False,
    )


def test_author_may_delete_own_comment():
    assert Principal(5, "user").may_delete(comment_by(5))


def test_other_user_may_not_delete():
    """A viewer cannot remove someone else's comment."""
    assert not Principal(6, "user").may_delete(comment_by(5))


def test_moderator_may_delete_anyones_comment():
    moderator = Principal(99, "moderator")
    assert moderator.may_delete(comment_by(5))
    assert moderator.may_delete(comment_by(99))
