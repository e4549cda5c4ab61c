"""A started request's text to the client: one JSON body (`whole`) or a server-sent-event stream
(`stream`), for its n choices; the bodies come from the route's Reply (schemas.py).

Usage counts the prompt once and the completion tokens of every choice (as OpenAI does for n).
A stream sends, per choice, a chunk per piece of text (chat: the role only in the choice's
first delta), the finish_reason on the chunk that ends the choice, then, only with
`stream_options.include_usage`, a chunk with `choices: []` and the usage, then `data: [DONE]`.
With vLLM's `continuous_usage_stats` as well, every chunk carries its choice's usage so far.
A choice that failed in the engine fails the request and aborts its other choices: a whole
response is a 500 with the reason; a stream sends that choice's chunk with finish_reason "error",
an error event (the openai client raises it) and `[DONE]`. A deadline that
passes is an error event. Nothing is sent while a request waits, so a send cannot notice a
client that left: a watcher does, and aborts every choice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ecoserve_common.plan import TokenLogprob

from ..follow import Follow, Piece
from .edge import error_body
from .metrics import Metrics
from .schemas import Reply, Usage

if TYPE_CHECKING:
    from .generation import Options

Pieces = AsyncGenerator[tuple[int, Piece, list[TokenLogprob | None]], None]


def finish_of(reason: str | None) -> str | None:
    """The engine's finish reason as OpenAI's: stop, length, error (a failure) or aborted."""
    if not reason:
        return None
    return reason if reason in ("stop", "length") else "error" if "failed" in reason else reason


async def observed(metrics: Metrics, pieces: Pieces) -> Pieces:
    """`pieces`, each choice's end observed in the metrics (its time to first token, its
    tokens, its end) as a request of its own."""
    t0, first = time.monotonic(), {}
    try:
        async for i, (text, finish, n), logprobs in pieces:
            if n and i not in first:
                first[i] = time.monotonic()
            if finish:
                metrics.observe(t0, first.get(i), n, finish)
            yield i, (text, finish, n), logprobs
    finally:
        await pieces.aclose()


async def whole(
    reply: Reply, pieces: Pieces, prompt_len: int, follows: list[Follow], request: Request
) -> JSONResponse:
    """The whole response once every choice ended: 500 if one failed, 504 past the deadline."""
    gone = _close_on_disconnect(request, follows)
    n = len(follows)
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob | None]] = [[] for _ in range(n)]
    reasons, tokens = [""] * n, [0] * n
    try:
        async for i, (text, finish, k), lps in pieces:
            texts[i].append(text)
            logprobs[i] += lps
            reasons[i], tokens[i] = finish or reasons[i], k
            if finish and finish.startswith("failed"):
                break  # the request fails: its other choices are aborted as the pieces close
    except TimeoutError as e:
        return JSONResponse(error_body(str(e), "timeout"), 504)
    finally:
        gone.cancel()
        await pieces.aclose()
    failed = [r for r in reasons if r.startswith("failed")]
    if failed:
        return JSONResponse(error_body(failed[0], "server_error", None, "request_failed"), 500)
    outcomes = [
        ("".join(t), finish_of(r), lps) for t, r, lps in zip(texts, reasons, logprobs, strict=True)
    ]
    return JSONResponse(reply.whole(outcomes, Usage.of(prompt_len, sum(tokens))))


def stream(
    reply: Reply,
    pieces: Pieces,
    prompt_len: int,
    options: Options,
    follows: list[Follow],
    request: Request,
) -> StreamingResponse:
    events = _events(reply, pieces, prompt_len, options, follows, request)
    return _Stream(events, lambda: _close_all(follows))


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


def _close_all(follows: list[Follow]) -> None:
    """End every choice's follow: a request still running is aborted and recorded so."""
    for f in follows:
        f.close()


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _events(
    reply: Reply,
    pieces: Pieces,
    prompt_len: int,
    options: Options,
    follows: list[Follow],
    request: Request,
) -> AsyncIterator[str]:
    """The SSE stream (see the module docstring)."""
    gone = _close_on_disconnect(request, follows)
    first, tokens, failed = set(range(len(follows))), [0] * len(follows), False
    try:
        async for i, (text, finish, k), lps in pieces:
            tokens[i] = k
            usage = Usage.of(prompt_len, k) if options.continuous_usage else None
            chunk = reply.chunk(
                i, text, finish_of(finish), i in first, options.include_usage, usage, lps
            )
            first.discard(i)
            yield _sse(chunk)
            if finish and finish.startswith("failed"):
                yield _sse(error_body(finish, "server_error", None, "request_failed"))
                failed = True
                break  # the other choices are aborted as the pieces close
        if options.include_usage and not failed:
            yield _sse(reply.usage_chunk(Usage.of(prompt_len, sum(tokens))))
        yield "data: [DONE]\n\n"
    except TimeoutError as e:
        yield _sse(error_body(str(e), "timeout"))
    finally:
        gone.cancel()
        await pieces.aclose()  # a client that left: its requests aborted and recorded


async def _disconnected(request: Request) -> None:
    """Return when the client closes its connection (the body is already read, so the next
    ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _close_on_disconnect(request: Request, follows: list[Follow]) -> asyncio.Task:
    """A task that, when the client hangs up, aborts every choice's request and records it
    aborted (cancel it once the response is done)."""

    async def watch() -> None:
        await _disconnected(request)
        for f in follows:
            f.close()

    return asyncio.ensure_future(watch())
