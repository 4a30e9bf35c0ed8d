"""Client keys: reading the bearer token, hashing, constant-time comparison.

Until key management lands, one static key (`GATEWAY_API_KEY`) lets clients in.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from app.errors import AuthenticationError


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key (by id and name, never its secret) and its team."""

    key_id: str
    key_name: str
    team: str | None = None
    models: tuple[str, ...] = ()
    attributes: dict[str, Any] = field(default_factory=dict)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer …` header, or a 401 saying what is missing."""
    if not authorization:
        raise AuthenticationError("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("The Authorization header must be 'Bearer <key>'.")
    return token


class StaticKeyAuthenticator:
    """One shared key; compares SHA-256 digests in constant time."""

    def __init__(self, key: str) -> None:
        self._digest = hash_key(key)
        self._principal = Principal(key_id="static", key_name="static")

    def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if not hmac.compare_digest(hash_key(token), self._digest):
            raise AuthenticationError("Incorrect API key provided.")
        return self._principal
