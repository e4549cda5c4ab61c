"""What the completions and chat routes share: the app's context, OpenAI-shaped errors, turning
a request body into checked SamplingParams, and running one request to a whole JSON response
or a server-sent-event stream.

One request, in order:
1. admission (`Frontend.admit`) on the event loop: over capacity is a 429 with Retry-After at
   once, before any tokenizing, and never more than `max_pending` requests in the system;
2. building the prompt (the chat template), tokenizing, the predictor call and the submit in
   the app's own small thread pool (`start_threads`), never the event loop and never the
   default pool that sync routes share; the admission is released once the engine holds the
   request;
3. following its tokens on the event loop (streaming.text_pieces): no thread waits for them,
   so any number of waiting streams leaves /health, /metrics and /stats answering.

A client that disconnects, streaming or not, has its request aborted at once (its KV blocks are
freed in the engine's next iteration) and its row recorded aborted. A request that fails in the
engine (e.g. its sampling failed on the worker) is a 500 `server_error` with the reason, or,
streaming, a last chunk with finish_reason "error" and then an error event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ecoserve_common.sampling import (
    InvalidSampling,
    SamplingParams,
    check_penalty,
    check_stop_strings,
)

from ..follow import Follow
from ..frontend import RETRY_AFTER_S, Admission, Frontend, GenerateParams, Rejected
from .edge import error_body
from .metrics import Metrics
from .schemas import SamplingFields, Usage
from .streaming import text_pieces

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
    pool: ThreadPoolExecutor  # prompt building, tokenizing, predicting, submitting

    @property
    def tokenizer(self):
        return self.frontend.tokenizer


async def context(request: Request) -> ApiContext:
    """FastAPI dependency: the app's ApiContext (async: a sync dependency would take a thread
    of the shared pool for every request, /health's included)."""
    return request.app.state.ecoserve


Ctx = Annotated[ApiContext, Depends(context)]  # a route's `ctx: Ctx` parameter


def error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse(error_body(message, kind, param, code), status, headers=headers)


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
        check_penalty("presence_penalty", body.presence_penalty, 0.0)
        check_penalty("frequency_penalty", body.frequency_penalty, 0.0)
        check_penalty("repetition_penalty", body.repetition_penalty, 1.0)
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
    """OpenAI's `stop`: a string or up to 4 strings (empty ones ignored), each bounded."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return check_stop_strings(stop)
    except InvalidSampling as e:
        raise BadRequest(e.message, e.field) from None


def finish_of(reason: str | None) -> str | None:
    """The engine's finish reason as OpenAI's: stop, length, error (a failure) or aborted."""
    if not reason:
        return None
    return reason if reason in ("stop", "length") else "error" if "failed" in reason else reason


def _rejected(r: Rejected) -> JSONResponse:
    retry = {"Retry-After": str(max(1, round(RETRY_AFTER_S)))}
    if r.code == "exhausted":
        return error(429, r.message, "rate_limit_error", headers=retry)
    if r.code == "unavailable":
        return error(503, r.message, "service_unavailable", headers=retry)
    return error(400, r.message, param=r.param)


async def _disconnected(request: Request) -> None:
    """Return when the client closes its connection (the body is already read, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _close_on_disconnect(request: Request, follows: list[Follow]) -> asyncio.Task:
    """A task that, when the client hangs up, aborts the request and records it aborted
    (cancel it once the response is done)."""

    async def watch() -> None:
        await _disconnected(request)
        for f in follows:
            f.close()

    return asyncio.ensure_future(watch())


async def _start(ctx: ApiContext, build: Callable[[], GenerateParams], admission: Admission):
    """(params, handle, prompt tokens) from `build` and Frontend.start, in the app's pool. If
    the caller is cancelled meanwhile, a request that started anyway is aborted."""

    def job():
        try:
            params = build()
            handle, n = ctx.frontend.start(params, admission)
            return params, handle, n
        finally:
            admission.release()

    future = ctx.pool.submit(job)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if future.cancelled():
            admission.release()  # it never ran
        else:
            future.add_done_callback(lambda done: _abort_started(ctx.frontend, done))
        raise


def _abort_started(frontend: Frontend, done: Future) -> None:
    if not done.cancelled() and done.exception() is None:
        frontend.following(done.result()[1]).close()


async def generate(
    ctx: ApiContext,
    build: Callable[[], GenerateParams],
    render: Render,
    stream: bool,
    request: Request,
):
    """Run one request: 400 / 429 when refused, else a JSON body or an SSE stream of chunks.
    `build` makes the GenerateParams (in the pool: it may render a chat template); their
    `request_id` is the response's `id`."""
    frontend = ctx.frontend
    try:
        admission = frontend.admit()
        params, handle, prompt_len = await _start(ctx, build, admission)
    except BadRequest as e:
        return error(400, e.message, param=e.param)
    except InvalidSampling as e:
        return error(400, e.message, param=e.field)
    except Rejected as r:
        return _rejected(r)
    t0, first, follows = time.monotonic(), None, []

    async def pieces() -> AsyncGenerator[tuple[str, str | None, int], None]:
        nonlocal first
        async for text, finish, n in text_pieces(
            frontend, handle, params.sampling, params.stop, ctx.timeout_s, follows.append
        ):
            if n and first is None:
                first = time.monotonic()
            if finish:
                ctx.metrics.observe(t0, first, n, finish)
            yield text, finish, n

    if stream:
        events = _events(ctx, request, pieces(), render, prompt_len, follows)
        return _Stream(events, lambda: _close_all(frontend, handle, follows))
    gone = _close_on_disconnect(request, follows)
    parts, reason, n_tokens = [], "", 0
    try:
        async for text, finish, n in pieces():
            parts.append(text)
            reason, n_tokens = finish or reason, n
    except TimeoutError as e:
        return error(504, str(e), "timeout")
    finally:
        gone.cancel()
    if reason.startswith("failed"):
        return error(500, reason, "server_error", code="request_failed")
    return JSONResponse(render("".join(parts), reason, False, Usage.of(prompt_len, n_tokens)))


class _Stream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends, even if its body never started
    (a client gone before the headers were sent)."""

    def __init__(self, body: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _close_all(frontend: Frontend, handle, follows: list[Follow]) -> None:
    """End the request's follow (one made here if the stream never began): a request still
    running is aborted and recorded so."""
    for f in follows or [frontend.following(handle)]:
        f.close()


async def _events(
    ctx: ApiContext,
    request: Request,
    pieces: AsyncGenerator[tuple[str, str | None, int], None],
    render: Render,
    prompt_len: int,
    follows: list[Follow],
) -> AsyncIterator[str]:
    """The SSE stream: a chunk per piece, the usage on the last, then [DONE]. Nothing is sent
    while a request waits, so a send cannot notice a client that left: a watcher does."""
    gone = _close_on_disconnect(request, follows)
    try:
        async for text, finish, n in pieces:
            usage = Usage.of(prompt_len, n) if finish else None
            yield f"data: {json.dumps(render(text, finish, True, usage))}\n\n"
            if finish and finish.startswith("failed"):
                failed = error_body(finish, "server_error", None, "request_failed")
                yield f"data: {json.dumps(failed)}\n\n"
        yield "data: [DONE]\n\n"
    except TimeoutError as e:
        yield f"data: {json.dumps(error_body(str(e), 'timeout'))}\n\n"
    finally:
        gone.cancel()
        await pieces.aclose()  # a client that left: its request aborted and recorded
