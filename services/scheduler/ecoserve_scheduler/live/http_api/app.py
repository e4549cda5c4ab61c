"""The app factory: one FastAPI app per Frontend, its routers wired to an ApiContext kept on
`app.state.ecoserve` (routes take it as a dependency), the edge guard (API key, body size and
time: edge.py) around it, and OpenAI's error shape for every error, including bodies that fail
validation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from ..frontend import Frontend
from . import admin, chat, completions
from .edge import EdgeGuard, http_error, internal_error
from .generation import DEFAULT_TIMEOUT_S, ApiContext, error
from .metrics import Metrics
from .server import HttpLimits


def create_app(
    frontend: Frontend,
    model_id: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    api_key: str = "",
    limits: HttpLimits | None = None,
) -> FastAPI:
    """With `api_key`, every route but /health, /livez, /metrics and /stats (probes, scrapers)
    needs `Authorization: Bearer <key>`. `limits` bound bodies and the start-up threads; serve
    the app with `uvicorn_config(app, ..., limits)` so connections are bounded too."""
    limits = limits or HttpLimits()
    app = FastAPI(title="EcoServe", version="0.1.0")
    pool = ThreadPoolExecutor(limits.start_threads, thread_name_prefix="http-start")
    app.state.ecoserve = ApiContext(frontend, model_id, timeout_s, Metrics(frontend), pool)
    for module in (completions, chat, admin):
        app.include_router(module.router)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(
        EdgeGuard,
        api_key=api_key,
        max_body_bytes=limits.max_body_bytes,
        body_timeout_s=limits.body_timeout_s,
    )
    return app


async def _bad_request(_request: Request, exc: Exception):
    """A body that fails validation: 400 naming the first field at fault. A field the API does
    not declare is "unrecognized", as OpenAI says (bodies.py: never silently ignored). The
    message lists what was wrong without echoing the input (which may be large, or a secret)."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"] if errors else []
    param = ".".join(loc) or None
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        if e.get("type") == "extra_forbidden":
            parts.append(f"unrecognized request argument supplied: {where}")
        else:
            parts.append(f"{where}: {e.get('msg')}")
    return error(400, "invalid request: " + "; ".join(parts), param=param)
