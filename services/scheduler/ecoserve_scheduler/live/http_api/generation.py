"""What the completions and chat routes share: the app's context, OpenAI-shaped errors, turning
a request body into checked SamplingParams, and running one request to a whole JSON response
or a server-sent-event stream.

A client that disconnects, streaming or not, has its request aborted at once, so its KV blocks
are freed in the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from ecoserve_common.sampling import InvalidSampling, SamplingParams

from ..detokenize import MAX_STOP
from ..frontend import RETRY_AFTER_S, Frontend, GenerateParams, Rejected
from .metrics import Metrics
from .schemas import ErrorDetail, ErrorResponse, SamplingFields, Usage

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions

# render(text, finish_reason, stream, usage) -> the response or chunk body
Render = Callable[[str, str | None, bool, Usage | None], dict[str, Any]]


@dataclass
class ApiContext:
    """What every route needs, kept on `app.state.ecoserve` (see `context`)."""

    frontend: Frontend
    model_id: str
    timeout_s: float
    metrics: Metrics

    @property
    def tokenizer(self):
        return self.frontend.tokenizer


def context(request: Request) -> ApiContext:
    """FastAPI dependency: the app's ApiContext."""
    return request.app.state.ecoserve


Ctx = Annotated[ApiContext, Depends(context)]  # a route's `ctx: Ctx` parameter


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    detail = ErrorDetail(message=message, type=kind, param=param, code=code)
    return ErrorResponse(error=detail).model_dump()


def error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    body = error_body(message, kind, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


def unknown_model(ctx: ApiContext, model: str) -> JSONResponse | None:
    """OpenAI's 404 for a model this server does not serve; None when `model` is the served
    one or empty (the served model is then used: one model per server)."""
    if not model or model == ctx.model_id:
        return None
    return error(
        404,
        f"The model `{model}` does not exist.",
        param="model",
        code="model_not_found",
    )


class BadRequest(Exception):
    """A 400 raised from a route's helpers; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def sampling_of(body: SamplingFields, max_tokens: int | None) -> SamplingParams:
    """The contract's SamplingParams for a request body; raises BadRequest naming the field."""
    if body.n != 1:
        raise BadRequest("only n=1 is supported", "n")
    try:
        return SamplingParams.checked(
            max_tokens=max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS,
            temperature=body.temperature,
            top_p=body.top_p or 1.0,  # 0 means no nucleus cut, as over gRPC
            top_k=body.top_k,
            seed=body.seed,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos,
        )
    except InvalidSampling as e:
        raise BadRequest(e.message, e.field) from None


def stops_of(body: SamplingFields) -> tuple[str, ...]:
    """OpenAI's `stop`: a string or up to 4 strings (empty ones ignored)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise BadRequest(f"stop takes at most {MAX_STOP} strings (got {len(stop)})", "stop")
    return tuple(s for s in stop if s)


def finish_of(reason: str | None) -> str | None:
    """The engine's finish reason as OpenAI's: stop, length, error (a failure) or aborted."""
    if not reason:
        return None
    return reason if reason in ("stop", "length") else "error" if "failed" in reason else reason


async def _disconnected(request: Request) -> None:
    """Return when the client closes its connection (the body is already read, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _cancel_on_disconnect(ctx: ApiContext, request: Request, handle) -> asyncio.Task:
    """A task that aborts the request when its client hangs up (cancel it once done)."""

    async def watch() -> None:
        await _disconnected(request)
        if not handle.done.is_set():
            ctx.frontend.cancel(handle.request_id)

    return asyncio.ensure_future(watch())


async def generate(
    ctx: ApiContext, params: GenerateParams, render: Render, stream: bool, request: Request
):
    """Run one request: 400 / 429 when refused, else a JSON body or an SSE stream of chunks.
    `params.request_id` is the response's `id`."""
    frontend = ctx.frontend
    try:  # validation, predictor call and store write block: off the event loop
        handle, prompt_len = await run_in_threadpool(frontend.start, params)
    except InvalidSampling as e:
        return error(400, e.message, param=e.field)
    except Rejected as r:
        if r.code == "exhausted":
            retry = {"Retry-After": str(max(1, round(RETRY_AFTER_S)))}
            return error(429, r.message, "rate_limit_error", headers=retry)
        return error(400, r.message)
    t0 = time.monotonic()
    n_tokens = 0

    def texts() -> Iterator[tuple[str, str | None]]:
        """(text, finish) from the request's text path; the last has its finish reason."""
        nonlocal n_tokens
        first = None
        for text, finish, n in frontend.follow_text(
            handle, params.sampling, params.stop, ctx.timeout_s
        ):
            n_tokens = n
            if n and first is None:
                first = time.monotonic()
            if finish:
                ctx.metrics.observe(t0, first, n, finish)
            yield text, finish

    def usage() -> Usage:
        return Usage.of(prompt_len, n_tokens)

    if stream:

        def events() -> Iterator[str]:
            try:
                for text, finish in texts():
                    chunk = render(text, finish, True, usage() if finish else None)
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            except TimeoutError as e:
                yield f"data: {json.dumps(error_body(str(e), 'timeout'))}\n\n"

        async def sse() -> AsyncIterator[str]:
            # Nothing is sent while a request waits, so the send cannot notice a client that
            # left: a watcher does, and the abort ends `follow` in its thread.
            gone = _cancel_on_disconnect(ctx, request, handle)
            try:
                async for chunk in iterate_in_threadpool(events()):
                    yield chunk
            finally:
                gone.cancel()
                if not handle.done.is_set():
                    frontend.cancel(handle.request_id)

        return StreamingResponse(sse(), media_type="text/event-stream")

    def collect() -> tuple[str, str]:
        parts, reason = [], ""
        for text, finish in texts():
            parts.append(text)
            reason = finish or reason
        return "".join(parts), reason

    gone = _cancel_on_disconnect(ctx, request, handle)
    try:
        out, reason = await run_in_threadpool(collect)
    except TimeoutError as e:
        return error(504, str(e), "timeout")
    finally:
        gone.cancel()
    return JSONResponse(render(out, reason, False, usage()))
