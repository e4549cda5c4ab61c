"""OpenAI-compatible HTTP API over the Frontend: /v1/completions, /v1/chat/completions
(streaming as server-sent events, or not), /v1/models, /health and Prometheus /metrics.

Errors use OpenAI's shape, {"error": {"message", "type", "code"}}: 400 for bad input, 429 with
Retry-After when over capacity, 504 when the request's timeout passes. A streaming client that
disconnects, streaming or not, has its request aborted at once, so its KV blocks are freed in
the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from .frontend import RETRY_AFTER_S, Frontend, GenerateParams, Rejected

DEFAULT_TIMEOUT_S = 600.0


class _Common(BaseModel):
    model: str = ""
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extension
    seed: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension
    n: int = 1
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class Metrics:
    """Prometheus series of one app (own registry: no global state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "ecoserve_requests", "Finished requests", ["finish_reason"], registry=r
        )
        self.ttft = Histogram("ecoserve_ttft_seconds", "Time to first token", registry=r)
        self.tpot = Histogram(
            "ecoserve_tpot_seconds",
            "Time per output token after the first",
            registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
        )
        self.jct = Histogram("ecoserve_jct_seconds", "Request completion time", registry=r)
        self.pending = Gauge("ecoserve_pending_requests", "Requests in the system", registry=r)
        self.waiting = Gauge("ecoserve_waiting_requests", "Requests queued in the core", registry=r)
        self.kv_blocks = Gauge("ecoserve_kv_blocks", "KV blocks", ["worker", "state"], registry=r)
        self.kv_tokens = Gauge(
            "ecoserve_kv_tokens_written", "KV tokens written", ["worker"], registry=r
        )
        self.preemptions = Gauge("ecoserve_preemptions", "Preemptions so far", registry=r)
        self.pred_calls = Gauge("ecoserve_predictor_calls", "Predictor calls", registry=r)
        self.pred_errors = Gauge("ecoserve_predictor_errors", "Predictor failures", registry=r)
        self.pred_latency = Gauge(
            "ecoserve_predictor_latency_seconds_mean", "Mean predictor call time", registry=r
        )

    def refresh(self, frontend: Frontend) -> bytes:
        snap = frontend.engine.stats_snapshot
        self.pending.set(frontend.engine.pending)
        self.waiting.set(snap.get("waiting", 0))
        self.preemptions.set(snap.get("preemptions", 0))
        for wid, kv in snap.get("kv", {}).items():
            self.kv_blocks.labels(wid, "used").set(kv["blocks_used"])
            self.kv_blocks.labels(wid, "total").set(kv["num_blocks"])
            self.kv_tokens.labels(wid).set(kv["tokens_written"])
        p = frontend.predictor
        self.pred_calls.set(p.calls)
        self.pred_errors.set(p.failures)
        self.pred_latency.set(p.latency_s_total / p.calls if p.calls else 0.0)
        return generate_latest(self.registry)


async def _disconnected(request: Request) -> None:
    """Return when the client closes its connection (the body is already read, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(status: int, message: str, kind: str, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(
    frontend: Frontend, model_id: str, timeout_s: float = DEFAULT_TIMEOUT_S, api_key: str = ""
) -> FastAPI:
    """With `api_key`, every /v1 route needs `Authorization: Bearer <key>` (/health and
    /metrics stay open for probes and scrapers)."""
    app = FastAPI(title="EcoServe", version="0.1.0")
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                return _error(401, "missing or wrong API key", "authentication_error")
        return await call_next(request)

    metrics = Metrics()
    tok = frontend.tokenizer

    @app.exception_handler(RequestValidationError)
    async def bad_request(_req: Request, exc: RequestValidationError):
        return _error(400, f"invalid request: {exc.errors()}"[:2000], "invalid_request_error")

    def params_of(body: _Common, prompt: str = "", ids=(), max_tokens=None) -> GenerateParams:
        if body.n != 1:
            raise Rejected("invalid", "only n=1 is supported")
        if body.stop:
            raise Rejected("invalid", "stop strings are not supported; use stop_token_ids")
        return GenerateParams(
            prompt=prompt,
            prompt_token_ids=tuple(ids),
            max_tokens=max_tokens if max_tokens is not None else 16,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop_token_ids=tuple(body.stop_token_ids),
            ignore_eos=body.ignore_eos,
        )

    def cancel_on_disconnect(request: Request, handle) -> asyncio.Task:
        """A task that aborts the request when its client hangs up (cancel it once done)."""

        async def watch() -> None:
            await _disconnected(request)
            if not handle.done.is_set():
                frontend.cancel(handle.request_id)

        return asyncio.ensure_future(watch())

    async def run(params: GenerateParams, render, stream: bool, request: Request):
        try:  # validation, predictor call and store write block: off the event loop
            handle, prompt_len = await run_in_threadpool(frontend.start, params)
        except Rejected as r:
            if r.code == "exhausted":
                return _error(
                    429,
                    r.message,
                    "rate_limit_error",
                    {"Retry-After": str(max(1, round(RETRY_AFTER_S)))},
                )
            return _error(400, r.message, "invalid_request_error")
        rid, created, t0 = f"cmpl-{uuid.uuid4().hex}", int(time.time()), time.monotonic()
        usage = lambda n: {  # noqa: E731
            "prompt_tokens": prompt_len,
            "completion_tokens": n,
            "total_tokens": prompt_len + n,
        }

        def observe(first_s: float | None, n: int, reason: str) -> None:
            end = time.monotonic()
            metrics.requests.labels(reason.split(":")[0]).inc()
            metrics.jct.observe(end - t0)
            if first_s is not None:
                metrics.ttft.observe(first_s - t0)
                if n > 1:
                    metrics.tpot.observe((end - first_s) / (n - 1))

        if stream:

            def events() -> Iterator[str]:
                first = None
                try:
                    for tokens, finish in frontend.follow(handle, timeout_s):
                        if tokens and first is None:
                            first = time.monotonic()
                        text = tok.decode(tokens) if tokens else ""
                        chunk = render(rid, created, text, finish, stream=True)
                        if finish:
                            chunk["usage"] = usage(len(handle.tokens))
                            observe(first, len(handle.tokens), finish)
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                except TimeoutError as e:
                    yield f"data: {json.dumps({'error': {'message': str(e), 'code': 504}})}\n\n"

            async def sse() -> AsyncIterator[str]:
                # Nothing is sent while a request waits, so the send cannot notice a client
                # that left: a watcher does, and the abort ends `follow` in its thread.
                gone = cancel_on_disconnect(request, handle)
                try:
                    async for chunk in iterate_in_threadpool(events()):
                        yield chunk
                finally:
                    gone.cancel()
                    if not handle.done.is_set():
                        frontend.cancel(handle.request_id)

            return StreamingResponse(sse(), media_type="text/event-stream")

        def collect() -> float | None:
            first = None
            for tokens, _ in frontend.follow(handle, timeout_s):
                if tokens and first is None:
                    first = time.monotonic()
            return first

        gone = cancel_on_disconnect(request, handle)
        try:
            first = await run_in_threadpool(collect)
        except TimeoutError as e:
            return _error(504, str(e), "timeout")
        finally:
            gone.cancel()
        reason = handle.finish_reason or ""
        observe(first, len(handle.tokens), reason)
        body = render(rid, created, tok.decode(handle.tokens), reason, stream=False)
        body["usage"] = usage(len(handle.tokens))
        return JSONResponse(body)

    def finish_of(reason: str | None) -> str | None:
        if not reason:
            return None
        return reason if reason in ("stop", "length") else "error" if "failed" in reason else reason

    def render_completion(rid, created, text, reason, stream):
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_of(reason)}
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model_id,
            "choices": [choice],
        }

    def render_chat(rid, created, text, reason, stream):
        if stream:
            choice = {
                "index": 0,
                "delta": {"role": "assistant", "content": text},
                "finish_reason": finish_of(reason),
            }
            obj = "chat.completion.chunk"
        else:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_of(reason),
            }
            obj = "chat.completion"
        return {
            "id": "chat" + rid,
            "object": obj,
            "created": created,
            "model": model_id,
            "choices": [choice],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt, ids = body.prompt, ()
        if isinstance(prompt, list):
            if prompt and all(isinstance(x, str) for x in prompt):
                if len(prompt) != 1:
                    return _error(400, "one prompt per request", "invalid_request_error")
                prompt = prompt[0]
            else:
                prompt, ids = "", prompt
        try:
            params = params_of(body, prompt, ids, body.max_tokens)
        except Rejected as r:
            return _error(400, r.message, "invalid_request_error")
        return await run(params, render_completion, body.stream, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        messages = [m.model_dump() for m in body.messages]
        if not messages:
            return _error(400, "messages is empty", "invalid_request_error")
        if getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a model without a chat template: a plain transcript
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        try:
            params = params_of(body, prompt, (), body.max_completion_tokens or body.max_tokens)
        except Rejected as r:
            return _error(400, r.message, "invalid_request_error")
        return await run(params, render_chat, body.stream, request)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "ecoserve"}],
        }

    @app.get("/health")
    def health():
        workers = frontend.engine.worker_ids()
        status = 200 if workers else 503
        return JSONResponse(
            {"status": "ok" if workers else "no workers", "workers": workers}, status_code=status
        )

    @app.get("/metrics")
    def prometheus():
        return Response(metrics.refresh(frontend), media_type="text/plain; version=0.0.4")

    return app
