"""What the completions and chat routes share: the app's context, OpenAI-shaped errors, turning
a request body into checked SamplingParams and Options, and running one request (its n choices)
to a whole JSON response or a server-sent-event stream (output.py).

One request, in order:
1. admission (`Frontend.admit`, once per choice: choices.admit) on the event loop: over
   capacity is a 429 with Retry-After at once, before any tokenizing, and never more than
   `max_pending` requests in the system;
2. building the prompt (the chat template), tokenizing, the predictor call and the submits in
   the app's own small thread pool (`start_threads`), never the event loop and never the
   default pool that sync routes share; each admission is released once the engine holds its
   request;
3. following the tokens on the event loop (streaming.text_pieces): no thread waits for them,
   so any number of waiting streams leaves /health, /metrics and /stats answering.

A client that disconnects, streaming or not, has its requests aborted at once (their KV blocks
are freed in the engine's next iteration) and their rows recorded aborted. A request that fails
in the engine (e.g. its sampling failed on the worker) is a 500 `server_error` with the reason,
or, streaming, a chunk with finish_reason "error" for that choice and then an error event.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from ecoserve_common.sampling import (
    InvalidSampling,
    SamplingParams,
    check_penalty,
    check_stop_strings,
)

from ..frontend import RETRY_AFTER_S, Frontend, GenerateParams, Rejected
from ..slo import InvalidSlo, SloAsk
from . import choices, output
from .bodies import SamplingFields
from .edge import BadRequest, error_body
from .fields import include_usage, logprobs_of, n_of, priority_of
from .metrics import Metrics
from .schemas import Reply
from .streaming import text_pieces

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


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
    return model_not_found(model)


def model_not_found(model: str) -> JSONResponse:
    shown = model if len(model) <= 100 else model[:97] + "..."  # a client's text, bounded
    return error(404, f"The model `{shown}` does not exist.", param="model", code="model_not_found")


def sampling_of(body: SamplingFields, max_tokens: int | None) -> SamplingParams:
    """The contract's SamplingParams for a request body; raises BadRequest naming the field.
    Null means the default, as in OpenAI's schema."""
    top = logprobs_of(body)
    param = "top_logprobs" if getattr(body, "top_logprobs", None) is not None else "logprobs"
    try:
        check_penalty("presence_penalty", body.presence_penalty, 0.0)
        check_penalty("frequency_penalty", body.frequency_penalty, 0.0)
        check_penalty("repetition_penalty", body.repetition_penalty, 1.0)
        return SamplingParams.checked(
            max_tokens=max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p or 1.0,  # 0 means no nucleus cut, as over gRPC
            top_k=0 if body.top_k in (None, -1) else body.top_k,  # vLLM's -1 is "off" too
            seed=body.seed,
            stop_token_ids=body.stop_token_ids or (),
            ignore_eos=bool(body.ignore_eos),
            logprobs=top,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            min_tokens=body.min_tokens or 0,
        )
    except InvalidSampling as e:
        field = param if e.field == "logprobs" else e.field  # the body's own name for it
        raise BadRequest(e.message, field) from None


def slo_of(ctx: ApiContext, body: SamplingFields) -> SloAsk:
    """The latency SLO the body's `ecoserve` object asks for, checked against the server's
    classes now (a 400 before admission, naming `ecoserve.<field>`); the Frontend resolves it
    again when the request starts (a class, its targets, the default class: live/slo.py)."""
    e = body.ecoserve
    ask = SloAsk() if e is None else SloAsk(e.slo_class, e.ttft_ms, e.tpot_ms, e.deadline_ms)
    try:
        ctx.frontend.slo_classes.resolve(ask)
    except InvalidSlo as exc:
        raise BadRequest(f"ecoserve.{exc.message}", f"ecoserve.{exc.field}") from None
    return ask


def stops_of(body: SamplingFields) -> tuple[str, ...]:
    """OpenAI's `stop`: a string or up to 4 strings (empty ones ignored), each bounded."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return check_stop_strings(stop)
    except InvalidSampling as e:
        raise BadRequest(e.message, e.field) from None


@dataclass(frozen=True)
class Options:
    """How a request is answered, besides its sampling."""

    n: int = 1  # choices
    stream: bool = False
    include_usage: bool = False  # a streamed request's last chunk: the usage
    continuous_usage: bool = False  # and every chunk: its choice's usage so far (vLLM's)


def options_of(body: SamplingFields) -> Options:
    """The body's Options; raises BadRequest naming `n` or `priority`."""
    priority_of(body)  # checked; not passed on (the Frontend takes none yet)
    return Options(n_of(body), bool(body.stream), *include_usage(body))


async def generate(
    ctx: ApiContext,
    build: Callable[[], GenerateParams],
    reply: Reply,
    options: Options,
    request: Request,
):
    """Run one request: 400 / 429 / 503 when refused, else a JSON body or an SSE stream.
    `build` makes the GenerateParams (in the pool: it may render a chat template); their
    `request_id` is the response's `id`."""
    frontend = ctx.frontend
    try:
        admissions = choices.admit(frontend, options.n)
        started = await choices.start(frontend, ctx.pool, build, admissions)
    except BadRequest as e:
        return error(400, e.message, param=e.param)
    except InvalidSampling as e:
        return error(400, e.message, param=e.field)
    except Rejected as r:
        return _rejected(r)
    follows = [frontend.following(h, ctx.timeout_s) for h in started.handles]
    pieces = output.observed(ctx.metrics, text_pieces(frontend, follows, started.params))
    if options.stream:
        return output.stream(reply, pieces, started.prompt_len, options, follows, request)
    return await output.whole(reply, pieces, started.prompt_len, follows, request)


def _rejected(r: Rejected) -> JSONResponse:
    retry = {"Retry-After": str(max(1, round(RETRY_AFTER_S)))}
    if r.code == "exhausted":
        return error(429, r.message, "rate_limit_error", headers=retry)
    if r.code == "unavailable":
        return error(503, r.message, "service_unavailable", headers=retry)
    return error(400, r.message, param=r.param)
