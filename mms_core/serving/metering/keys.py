"""API keys for the online server: create, revoke, list, and verify a bearer token.

Keys live in the metering database (see ``metering_db``). Nothing on the request path touches the
disk: ``KeyStore.verify`` answers from a short-lived cache.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mms_core.errors import MeteringError
from mms_core.serving.metering.db import ANONYMOUS, connect, init_db, transaction

_TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TOKEN_RE = re.compile(r"mms_(k_[0-9a-f]{16})_([A-Za-z0-9_-]{20,128})")


@dataclass(frozen=True)
class ApiKey:
    """One API key, without its secret."""

    key_id: str
    """Public part of the token (``k_`` + 16 hex digits), shown in listings and usage reports."""
    tenant: str
    """Who is billed for the key's usage."""
    admin: bool
    """Admin keys may call the server's ``/admin/*`` endpoints."""
    quota_rows_per_min: int | None
    """Rows per minute the key may send; None means unlimited."""
    created: datetime
    """When the key was created (timezone-aware UTC)."""
    revoked: bool
    """A revoked key is still recognised (the server answers 403, not 401)."""


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


class KeyStore:
    """API keys in the metering database: create, revoke, list, and verify a bearer token.

    Args:
        path: The SQLite file (created with its folder when missing).
        cache_ttl_s: How long a verified key is answered from memory. A key revoked by another
            process is seen as revoked within this many seconds.
        clock: Monotonic seconds, for the cache; tests pass a fake to skip waiting.
    """

    def __init__(
        self, *, path: Path, cache_ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if cache_ttl_s < 0:
            raise MeteringError(f"cache_ttl_s must be >= 0, got {cache_ttl_s}")
        self.path = Path(path)
        self._ttl = cache_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        # key_id -> (expires at, secret hash, record). Only keys that exist are cached, so the cache
        # is bounded by the number of keys, whatever tokens clients send.
        self._cache: dict[str, tuple[float, str, ApiKey]] = {}
        init_db(self.path)

    def create(
        self, *, tenant: str, admin: bool = False, quota_rows_per_min: int | None = None
    ) -> tuple[str, ApiKey]:
        """Create a key.

        Args:
            tenant: Who is billed: 1-64 characters of letters, digits, ``.``, ``_`` or ``-``.
                Not ``anonymous``, which is reserved for requests served without a key.
            admin: Whether the key may call ``/admin/*`` endpoints.
            quota_rows_per_min: Rows per minute the key may send (> 0), or None for unlimited.

        Returns:
            The token ``mms_<key_id>_<secret>`` (shown once: only a hash of the secret is kept)
            and the key's record.

        Raises:
            MeteringError: An invalid tenant or quota.
        """
        _check_tenant(tenant)
        _check_quota(quota_rows_per_min)
        secret = secrets.token_urlsafe(32)
        key = ApiKey(
            key_id=f"k_{secrets.token_hex(8)}",
            tenant=tenant,
            admin=bool(admin),
            quota_rows_per_min=quota_rows_per_min,
            created=_now(),
            revoked=False,
        )
        # The secret is 256 random bits, so a plain SHA-256 cannot be brute-forced; a slow KDF
        # (bcrypt, scrypt) only protects low-entropy passwords and would cost ms on every cache miss.
        with transaction(self.path) as conn:
            conn.execute(
                "INSERT INTO api_keys (key_id, secret_sha256, tenant, admin, quota_rows_per_min, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    key.key_id,
                    _sha256(secret),
                    tenant,
                    int(key.admin),
                    quota_rows_per_min,
                    key.created.isoformat(),
                ),
            )
        return f"mms_{key.key_id}_{secret}", key

    def revoke(self, *, key_id: str) -> ApiKey:
        """Revoke a key (revoking a revoked key changes nothing).

        Returns:
            The key's record, now revoked.

        Raises:
            MeteringError: No key has this id.
        """
        with transaction(self.path) as conn:
            conn.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?",
                (_now().isoformat(), key_id),
            )
            row = conn.execute(f"{_KEY_SELECT} WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise MeteringError(f"no API key {key_id!r}; `mms keys list` shows the existing keys")
        with self._lock:
            self._cache.pop(key_id, None)
        return _key_from_row(row)[1]

    def verify(self, token: str) -> ApiKey | None:
        """The key a bearer token belongs to (reads the database on a cache miss).

        Returns:
            The key's record (with ``revoked=True`` for a revoked key), or None for a malformed
            token, an unknown key or a wrong secret.
        """
        hit, key = self.verify_cached(token)
        if hit:
            return key
        key_id, secret = _TOKEN_RE.fullmatch(token).groups()
        with connect(self.path) as conn:
            row = conn.execute(f"{_KEY_SELECT} WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            return None
        cached = (self._clock() + self._ttl, *_key_from_row(row))
        with self._lock:
            self._cache[key_id] = cached
        return _check_secret(cached, secret)

    def verify_cached(self, token: str) -> tuple[bool, ApiKey | None]:
        """``(True, key or None)`` when memory alone can answer (a malformed token, a cached key);
        ``(False, None)`` when :meth:`verify` must read the database. Never touches the disk, so an
        event loop may call it; the server sends only misses to a thread."""
        match = _TOKEN_RE.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            return True, None
        key_id, secret = match.groups()
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is None or cached[0] <= self._clock():
            return False, None
        return True, _check_secret(cached, secret)

    def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        with connect(self.path) as conn:
            rows = conn.execute(f"{_KEY_SELECT} ORDER BY created, key_id").fetchall()
        return [_key_from_row(row)[1] for row in rows]


_KEY_SELECT = (
    "SELECT key_id, secret_sha256, tenant, admin, quota_rows_per_min, created, revoked_at FROM api_keys"
)


def _check_secret(cached: tuple[float, str, ApiKey], secret: str) -> ApiKey | None:
    _, secret_hash, key = cached
    return key if hmac.compare_digest(secret_hash, _sha256(secret)) else None


def _key_from_row(row: tuple) -> tuple[str, ApiKey]:
    key_id, secret_hash, tenant, admin, quota, created, revoked_at = row
    key = ApiKey(
        key_id=key_id,
        tenant=tenant,
        admin=bool(admin),
        quota_rows_per_min=quota,
        created=datetime.fromisoformat(created),
        revoked=revoked_at is not None,
    )
    return secret_hash, key


def _check_tenant(tenant: object) -> None:
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise MeteringError(
            f"invalid tenant {tenant!r}: use 1-64 characters of letters, digits, '.', '_' or '-' "
            "(e.g. --tenant acme-prod)"
        )
    if tenant == ANONYMOUS:
        raise MeteringError(
            f"tenant {ANONYMOUS!r} is reserved for requests served without a key; "
            "choose another name (e.g. --tenant acme-prod)"
        )


def _check_quota(quota: object) -> None:
    if quota is None:
        return
    if isinstance(quota, bool) or not isinstance(quota, int) or quota <= 0:
        raise MeteringError(
            f"invalid quota {quota!r}: give a whole number of rows per minute > 0, or no quota for unlimited"
        )
