"""Users, roles and API keys.

An API key is `tp_<prefix>_<secret>`. Only an HMAC-SHA256 of the whole key (keyed by TRADEPLANE_SECRET_KEY)
is stored, so a database leak does not leak usable keys and lookup is one indexed equality. The key is shown
once, at creation. Passwords, when set, are argon2id hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

import asyncpg
from argon2 import PasswordHasher

from tradeplane.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound, PermissionDenied

KEY_PREFIX = "tp"
AUTH_CACHE_SECONDS = 5.0  # a revoked key stops working within this long on every api replica


class Role(StrEnum):
    ADMIN = "admin"
    TRADER = "trader"
    READONLY = "readonly"
    SYSTEM = "system"


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: int
    username: str
    role: Role

    def require(self, *roles: Role) -> None:
        if self.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise PermissionDenied(f"role {self.role.value} may not do this (needs {allowed})")


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key_id: int
    key: str
    prefix: str


def hash_api_key(secret_key: str, key: str) -> str:
    return hmac.new(secret_key.encode(), key.encode(), hashlib.sha256).hexdigest()


def hash_password(password: str) -> str:
    return PasswordHasher().hash(password)


async def create_user(
    conn: asyncpg.Connection,
    username: str,
    role: Role,
    *,
    email: str | None = None,
    password: str | None = None,
) -> int:
    if not username or len(username) > 50:
        raise InvalidRequest("username must be 1 to 50 characters", code="invalid_username")
    try:
        user_id: int = await conn.fetchval(
            "INSERT INTO users (username, email, password_hash, role) VALUES ($1, $2, $3, $4) RETURNING id",
            username,
            email,
            hash_password(password) if password else None,
            role.value,
        )
    except asyncpg.UniqueViolationError:
        raise Conflict(f"user {username!r} already exists", code="user_exists") from None
    await conn.execute(
        "INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)"
        " VALUES (NULL, 'user.create', 'user', $1, jsonb_build_object('role', $2::text))",
        str(user_id),
        role.value,
    )
    return user_id


async def user_id_by_name(conn: asyncpg.Connection, username: str) -> int:
    user_id: int | None = await conn.fetchval("SELECT id FROM users WHERE username = $1", username)
    if user_id is None:
        raise NotFound(f"no user named {username!r}", code="user_not_found")
    return user_id


async def issue_api_key(conn: asyncpg.Connection, secret_key: str, user_id: int, name: str) -> IssuedKey:
    prefix = secrets.token_hex(4)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    key_id: int = await conn.fetchval(
        "INSERT INTO api_keys (user_id, name, key_prefix, key_hash) VALUES ($1, $2, $3, $4) RETURNING id",
        user_id,
        name,
        prefix,
        hash_api_key(secret_key, key),
    )
    await conn.execute(
        "INSERT INTO audit_log (actor_user_id, action, entity, entity_id, details)"
        " VALUES ($1, 'api_key.create', 'api_key', $2, jsonb_build_object('prefix', $3::text))",
        user_id,
        str(key_id),
        prefix,
    )
    return IssuedKey(key_id=key_id, key=key, prefix=prefix)


class ApiKeyAuthenticator:
    """Resolves a bearer key to a Principal, caching verified keys briefly to keep the hot path off the DB."""

    def __init__(self, secret_key: str) -> None:
        self._secret_key = secret_key
        self._cache: dict[str, tuple[float, Principal]] = {}

    def digest(self, key: str) -> str:
        """What is stored of `key` (api_keys.key_hash), to check it again later without keeping the key."""
        return hash_api_key(self._secret_key, key)

    async def authenticate(self, conn_source: asyncpg.Pool | asyncpg.Connection, key: str) -> Principal:
        if not key.startswith(f"{KEY_PREFIX}_") or len(key) > 200:
            raise AuthenticationFailed("malformed API key", code="invalid_api_key")
        digest = self.digest(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        principal = (await self.still_valid(conn_source, [digest])).get(digest)
        if principal is None:
            self._cache.pop(digest, None)
            raise AuthenticationFailed("unknown or revoked API key", code="invalid_api_key")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + AUTH_CACHE_SECONDS, principal)
        return principal

    async def still_valid(
        self, conn_source: asyncpg.Pool | asyncpg.Connection, digests: Collection[str]
    ) -> dict[str, Principal]:
        """Of the keys with these digests, those that still authenticate (not revoked, user active), with their
        principals as they are now: one query for any number of long-lived sessions, bypassing the cache."""
        rows = await conn_source.fetch(
            "SELECT k.key_hash, u.id, u.username, u.role FROM api_keys k JOIN users u ON u.id = k.user_id"
            " WHERE k.key_hash = ANY($1::text[]) AND k.revoked_at IS NULL AND u.is_active",
            list(digests),
        )
        return {
            row["key_hash"]: Principal(user_id=row["id"], username=row["username"], role=Role(row["role"]))
            for row in rows
        }
