"""API keys on the HTTP API: the gRPC front's keys and per-key limits (services/common/api_keys.py).

An ASGI middleware (not Starlette's BaseHTTPMiddleware, which would buffer streaming responses
and hide client disconnects): `Authorization: Bearer <key>` on every route but the probes';
401 (with `WWW-Authenticate: Bearer`) without a valid key, 429 (with `Retry-After`) past the
key's TANDEM_API_KEY_MAX_CONCURRENCY. A request holds its key's slot until its response,
streamed or not, is sent; the slots are the gRPC front's, so one key's limit covers both.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.responses import JSONResponse

from services.common.api_keys import ApiKeys, TooManyRequests, Unauthenticated

from .errors import RETRY_AFTER_S, error_body

OPEN_PATHS = ("/health",)  # probes need no key


class ApiKeyMiddleware:
    def __init__(self, app, keys: ApiKeys, open_paths: Sequence[str] = OPEN_PATHS):
        self.app = app
        self._keys = keys
        self._open = tuple(open_paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        try:
            kid = self._keys.authenticate(header.decode("latin-1") if header is not None else None)
        except Unauthenticated as e:
            body = error_body(str(e), "invalid_request_error", code="invalid_api_key")
            await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        try:
            with self._keys.slot(kid):  # raises TooManyRequests on entry only
                await self.app(scope, receive, send)
        except TooManyRequests as e:
            body = error_body(str(e), "rate_limit_exceeded", code="rate_limit_exceeded")
            await JSONResponse(body, 429, headers={"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send)
