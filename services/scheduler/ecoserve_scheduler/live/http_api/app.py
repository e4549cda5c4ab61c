"""The app factory: one FastAPI app per Frontend, its routers wired to an ApiContext kept on
`app.state.ecoserve` (routes take it as a dependency), the API-key guard on /v1, and OpenAI's
error shape for bodies that fail validation."""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError

from ..frontend import Frontend
from . import admin, chat, completions
from .generation import DEFAULT_TIMEOUT_S, ApiContext, error
from .metrics import Metrics


def create_app(
    frontend: Frontend, model_id: str, timeout_s: float = DEFAULT_TIMEOUT_S, api_key: str = ""
) -> FastAPI:
    """With `api_key`, every /v1 route needs `Authorization: Bearer <key>` (/health, /metrics
    and /stats stay open for probes and scrapers)."""
    app = FastAPI(title="EcoServe", version="0.1.0")
    app.state.ecoserve = ApiContext(frontend, model_id, timeout_s, Metrics())
    for module in (completions, chat, admin):
        app.include_router(module.router)
    app.add_exception_handler(RequestValidationError, _bad_request)
    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def check_key(request: Request, call_next):
            if request.url.path.startswith("/v1"):
                got = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(got, expected):
                    return error(401, "missing or wrong API key", "authentication_error")
            return await call_next(request)

    return app


async def _bad_request(_request: Request, exc: RequestValidationError):
    errors = exc.errors()
    loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"] if errors else []
    param = ".".join(loc) or None
    return error(400, f"invalid request: {errors}"[:2000], param=param)
