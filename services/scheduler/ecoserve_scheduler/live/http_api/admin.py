"""What operators and probes read: /health (503 while no worker is registered or the engine
core is down, with the reason: readiness), /livez (503 only while the engine is down:
liveness, since a scheduler without workers is not broken and a restart would not bring one),
/v1/models and /v1/models/{model} (the served model, or OpenAI's 404 `model_not_found`),
Prometheus /metrics and /stats (the scheduler's stats as JSON, as the gRPC Stats call gives).
/health, /livez, /metrics and /stats stay open when an API key guards the rest.

Every route here is `async` and quick (it reads snapshots the engine keeps): none waits for a
thread, so no amount of request traffic starves a probe or a scrape."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from .generation import Ctx, model_not_found
from .schemas import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
async def models(ctx: Ctx) -> dict:
    return ModelList(data=[ModelCard(id=ctx.model_id)]).model_dump()


@router.get("/v1/models/{model:path}")  # `path`: a model name may hold "/" (org/name)
async def model(model: str, ctx: Ctx):
    """OpenAI's retrieve: the served model's card, else 404 `model_not_found`."""
    if model == ctx.model_id:
        return ModelCard(id=ctx.model_id).model_dump()
    return model_not_found(model)


@router.get("/health")
async def health(ctx: Ctx) -> JSONResponse:
    engine = ctx.frontend.engine
    workers = engine.worker_ids()
    status = engine.failure or ("ok" if workers else "no workers")
    return JSONResponse(
        {"status": status, "workers": workers},
        status_code=200 if status == "ok" else 503,
    )


@router.get("/livez")
async def live(ctx: Ctx) -> JSONResponse:
    """The engine runs (its loop, or its core process), whatever the workers do."""
    failure = ctx.frontend.engine.failure
    return JSONResponse({"status": failure or "ok"}, status_code=503 if failure else 200)


@router.get("/metrics")
async def prometheus(ctx: Ctx) -> Response:
    return Response(ctx.metrics.refresh(ctx.frontend), media_type="text/plain; version=0.0.4")


@router.get("/stats")
async def stats(ctx: Ctx) -> dict:
    return ctx.frontend.stats()
