"""What operators and probes read: /health (503 while no worker is registered or the engine
core is down, with the reason), /v1/models, Prometheus /metrics and /stats (the scheduler's
stats as JSON, as the gRPC Stats call gives). /health, /metrics and /stats stay open when an
API key guards /v1."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from .generation import Ctx
from .schemas import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
def models(ctx: Ctx) -> dict:
    return ModelList(data=[ModelCard(id=ctx.model_id)]).model_dump()


@router.get("/health")
def health(ctx: Ctx) -> JSONResponse:
    engine = ctx.frontend.engine
    workers = engine.worker_ids()
    status = engine.failure or ("ok" if workers else "no workers")
    return JSONResponse(
        {"status": status, "workers": workers},
        status_code=200 if status == "ok" else 503,
    )


@router.get("/metrics")
def prometheus(ctx: Ctx) -> Response:
    return Response(ctx.metrics.refresh(ctx.frontend), media_type="text/plain; version=0.0.4")


@router.get("/stats")
def stats(ctx: Ctx) -> dict:
    return ctx.frontend.stats()
