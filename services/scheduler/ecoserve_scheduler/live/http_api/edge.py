"""What every HTTP request passes before a route sees it (`EdgeGuard`, plain ASGI middleware),
and the handlers that give every error OpenAI's JSON shape.

In order, before any body byte is parsed:
1. the API key, when one is set: every path but the probes (`OPEN_PATHS`: /health, /livez,
   /metrics, /stats) needs `Authorization: Bearer <key>` (401), so an unauthenticated client
   cannot make the server read, buffer or parse anything;
2. the body's size: a Content-Length over `max_body_bytes` is a 413 at once, unread; a body
   without one (chunked) is counted as it arrives and refused once it passes the limit;
3. the body's time: a body not complete within `body_timeout_s` is a 408 (a client that
   trickles a body cannot hold a connection and its buffer forever).
The body is then handed to the app in one message; later `receive` calls (the disconnect
watchers) go to the server as before.

Errors the framework raises (404, 405, a body that is not JSON) and anything unexpected (a 500
that says "internal error" and nothing of the exception, which is logged) use the same shape, as
does `BadRequest`, the 400 that the routes' helpers raise.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPEN_PATHS = frozenset({"/health", "/livez", "/metrics", "/stats"})  # probes, scrapers: no key


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BadRequest(Exception):
    """A 400 raised from a route's helpers; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class EdgeGuard:
    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        api_key: str = "",
        max_body_bytes: int = 4 << 20,
        body_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self.expected is not None and not self._authorized(scope, headers):
            await _reply(send, 401, "missing or wrong API key", "authentication_error")
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._too_large(send)
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
        except asyncio.TimeoutError:
            await _reply(send, 408, f"request body not received within {self.body_timeout_s:g} s")
            return
        except _ClientLeft:
            return
        if body is None:
            await self._too_large(send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        if scope.get("path") in OPEN_PATHS:
            return True
        assert self.expected is not None
        return hmac.compare_digest(headers.get(b"authorization", b""), self.expected)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes `max_body_bytes`; _ClientLeft if the client
        hung up first."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _ClientLeft
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _too_large(self, send: Send) -> None:
        await _reply(send, 413, f"request body over {self.max_body_bytes} bytes", close=True)


class _ClientLeft(Exception):
    """The client disconnected before its body was complete: nothing to answer."""


async def _reply(
    send: Send, status: int, message: str, kind: str = "invalid_request_error", close=False
) -> None:
    """An OpenAI-shaped error straight from the middleware; `close` ends the connection (its
    unread body must not be taken for the next request)."""
    body = json.dumps(error_body(message, kind)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def http_error(_request: Request, exc: Exception) -> JSONResponse:
    """The framework's HTTPExceptions (404, 405, a body that is not JSON) in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "invalid request"
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(message, kind), exc.status_code, headers=exc.headers)


async def internal_error(_request: Request, _exc: Exception) -> JSONResponse:
    """Anything unexpected, answered without its text (the server logs its traceback)."""
    return JSONResponse(error_body("internal error", "server_error"), 500)
