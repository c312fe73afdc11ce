"""API keys as FastAPI dependencies: ``Depends(auth.caller)`` (a key where the server requires one),
``Depends(auth.admin)`` on /admin routes (an admin key, always, loopback included: whoever reaches
the port must not roll out models). The two prediction routes call :meth:`Auth.key_of` themselves:
any FastAPI dependency on a route costs ~60 us of its ~230 us per request (measured, the app called
as ASGI with the router stubbed), a quarter of the server's throughput."""

from __future__ import annotations

import asyncio

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mms_core.serving.metering import ApiKey, KeyStore
from mms_core.serving.online.errors import ApiError

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer mms_...`; create a key with `mms keys create`.",
)


class Auth:
    """Verifies bearer tokens against ``keys``; ``required``: predictions need a key too."""

    def __init__(self, *, keys: KeyStore | None, required: bool) -> None:
        self.keys, self.required = keys, required

    async def caller(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)
    ) -> ApiKey | None:
        """The dependency form of :meth:`key_of` (``credentials`` puts the scheme in OpenAPI)."""
        return await self.key_of(request)

    async def admin(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)
    ) -> ApiKey:
        """The caller's key, which must be an admin key (`mms keys create --admin`)."""
        if "authorization" not in request.headers:
            raise ApiError(
                401, "missing_key",
                "the admin API needs an admin key: `Authorization: Bearer KEY` "
                "from `mms keys create --admin`",
            )  # fmt: skip
        key = await self.key_of(request)
        if not key.admin:
            raise ApiError(403, "not_admin", f"API key {key.key_id} may not call the admin API")
        return key

    async def key_of(self, request: Request) -> ApiKey | None:
        """The key of ``request``'s `Authorization: Bearer` header; None for an anonymous caller where
        keys are optional.

        Raises:
            ApiError: 401 no key where one is required, or an unknown or malformed one; 403 revoked.
        """
        header = request.headers.get("authorization")
        if header is None:
            if self.required:
                raise ApiError(
                    401, "missing_key",
                    "this server requires `Authorization: Bearer KEY`; create one with `mms keys create`",
                )  # fmt: skip
            return None
        scheme, _, token = header.partition(" ")
        return await self._verify(token.strip() if scheme.lower() == "bearer" else "")

    async def _verify(self, token: str) -> ApiKey:
        key = None
        if self.keys is not None and token:
            hit, key = self.keys.verify_cached(token)
            if not hit:  # SQLite on a thread: a slow disk must not stall every other request
                key = await asyncio.to_thread(self.keys.verify, token)
        if key is None:
            raise ApiError(401, "invalid_key", "unknown or malformed API key (expected `Bearer mms_...`)")
        if key.revoked:
            raise ApiError(403, "revoked_key", f"API key {key.key_id} was revoked; ask for a new one")
        return key
