"""Users and their API keys.

Keys are ``sk-proxyd-`` + 43 random URL-safe characters (256 bits): the prefix makes a leaked key
easy to recognise (secret scanners, logs). Only the SHA-256 of a key is stored; a plain hash is the
right tool for high-entropy secrets (a slow password hash would only cost CPU on every request).

The whole table lives in memory, loaded at start and changed only through this class, which writes
through the AccountStore (proxyd/storage/) first and updates memory after the commit: authenticating a
request is a dict lookup, never a query. With a shared store (PostgreSQL) other instances change users and
keys too: ``refresh`` reloads what they changed when told (docs/DESIGN.md "Several instances").
Every time stamped here comes from the injected clock.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import AuthError, Conflict, NotFound, PermissionDenied
from .storage import AccountStore, KeyRow, UserRecord, iso_s

__all__ = ["KEY_PREFIX", "Accounts", "Caller", "KeyRow", "User", "hash_key", "new_key"]

KEY_PREFIX = "sk-proxyd-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass
class User:
    user_id: str
    created_at: str
    disabled: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # admin limits, already parsed (nano-USD)


@dataclass(frozen=True)
class Caller:
    """Who is making a request: the result of authentication."""

    user: User
    key_id: str


class Accounts:
    def __init__(self, store: AccountStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.users: dict[str, User] = {}
        self.keys: dict[str, KeyRow] = {}  # key_id -> row
        self._by_hash: dict[str, str] = {}  # sha256 -> key_id, live keys only
        self._claimed: set[str] = set()  # user ids being created here, not yet committed

    def load(self, parse_overrides) -> None:
        """Start-up: reads users and keys into memory. ``parse_overrides`` validates stored limits."""
        self._parse_overrides = parse_overrides
        users, keys = self.store.load()
        for u in users:
            self.users[u.user_id] = User(u.user_id, u.created_at, u.disabled, parse_overrides(u.limits or {}))
        for k in keys:
            self.keys[k.key_id] = k
            if k.revoked_at is None:
                self._by_hash[k.key_hash] = k.key_id

    # -- the request path ---------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Caller:
        if not authorization:
            raise AuthError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer sk-proxyd-...'."
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("The Authorization header must be 'Bearer <API key>'.")
        key_id = self._by_hash.get(hash_key(token))
        if key_id is None:
            raise AuthError("Incorrect API key provided (unknown or revoked).")
        user = self.users[self.keys[key_id].user_id]
        if user.disabled:
            raise PermissionDenied(f"User {user.user_id} is disabled.", code="user_disabled")
        return Caller(user, key_id)

    # -- administration (every change is committed before memory changes) ------------------------

    def get(self, user_id: str) -> User:
        user = self.users.get(user_id)
        if user is None:
            raise NotFound(f"No user '{user_id}'.", code="user_not_found")
        return user

    async def create_user(self, user_id: str, overrides: dict[str, Any], overrides_raw: Any) -> tuple[User, str, str]:
        if user_id in self.users:
            raise Conflict(f"User '{user_id}' already exists.", code="user_exists")
        now = iso_s(self.clock())
        key, key_id = new_key(), _key_id()
        row = KeyRow(key_id, user_id, key[:14], now, hash_key(key))
        self.users[user_id] = user = User(user_id, now, False, overrides)  # claim the id before awaiting
        self._claimed.add(user_id)
        try:
            await self.store.insert_user(UserRecord(user_id, now, False, overrides_raw), row)
        except Exception:
            if self.users.get(user_id) is user:  # not replaced by another instance's user of that id (refresh)
                del self.users[user_id]
            raise
        finally:
            self._claimed.discard(user_id)
        self._remember(row)
        return user, key, key_id

    async def add_key(self, user_id: str) -> tuple[str, str]:
        self.get(user_id)
        key, key_id = new_key(), _key_id()
        row = KeyRow(key_id, user_id, key[:14], iso_s(self.clock()), hash_key(key))
        await self.store.insert_key(row)
        self._remember(row)
        return key, key_id

    async def revoke_key(self, key_id: str) -> None:
        row = self.keys.get(key_id)
        if row is None or row.revoked_at is not None:
            raise NotFound(f"No live key '{key_id}'.", code="key_not_found")
        now = iso_s(self.clock())
        await self.store.revoke_key(key_id, now)
        row.revoked_at = now
        del self._by_hash[row.key_hash]

    def _remember(self, row: KeyRow) -> None:
        self.keys[row.key_id] = row
        self._by_hash[row.key_hash] = row.key_id

    async def set_disabled(self, user_id: str, disabled: bool) -> User:
        user = self.get(user_id)
        await self.store.set_disabled(user_id, disabled)
        user.disabled = disabled
        return user

    async def set_overrides(self, user_id: str, overrides: dict[str, Any], overrides_raw: Any) -> User:
        user = self.get(user_id)
        await self.store.set_limits(user_id, overrides_raw)
        user.overrides = overrides
        return user

    # -- changes made by other instances (a shared store) --------------------------------------------------------

    async def refresh(self, user_id: str | None) -> list[tuple[list[str], Callable[[], Exception], str]]:
        """Reloads one user and its keys (None: everyone) from the store after another instance changed them.
        Returns what must be cut off here as ``Context.cut_off`` takes it: (key ids, error factory, reason)
        for each key revoked and each user disabled since memory last saw them."""
        users, keys = await self.store.fetch_accounts(user_id)
        cut: list[tuple[list[str], Callable[[], Exception], str]] = []
        disabled: list[str] = []
        for rec in users:
            user = self.users.get(rec.user_id)
            overrides = self._parse_overrides(rec.limits or {})
            if user is None or rec.user_id in self._claimed:  # new, or created by another instance first
                self.users[rec.user_id] = User(rec.user_id, rec.created_at, rec.disabled, overrides)
                continue
            if rec.disabled and not user.disabled:
                disabled.append(rec.user_id)
            user.disabled = rec.disabled
            if overrides != user.overrides:  # a new object only when changed: the meter caches by identity
                user.overrides = overrides
        for row in keys:
            old = self.keys.get(row.key_id)
            if old is not None and old.revoked_at is None and row.revoked_at is not None:
                cut.append(([row.key_id], lambda: AuthError("This API key was revoked."), "key_revoked"))
            if old is not None:
                self._by_hash.pop(old.key_hash, None)
            self.keys[row.key_id] = row
            if row.revoked_at is None:
                self._by_hash[row.key_hash] = row.key_id
        for uid in disabled:
            cut.append(([k.key_id for k in self.keys_of(uid)],
                        lambda uid=uid: PermissionDenied(f"User {uid} is disabled.", code="user_disabled"),
                        "user_disabled"))
        return cut

    def keys_of(self, user_id: str) -> list[KeyRow]:
        return [k for k in self.keys.values() if k.user_id == user_id]


def _key_id() -> str:
    return "key_" + secrets.token_hex(8)
