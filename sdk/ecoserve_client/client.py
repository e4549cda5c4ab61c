"""Sync and asyncio clients. Every call has a timeout; UNAVAILABLE (the scheduler restarting,
a connection not up yet) is retried with exponential backoff, a stream only before its first
chunk (a retried stream would repeat tokens). Other errors raise EcoServeError with the gRPC
status code and the server's message.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from ecoserve_common.pb import scheduler_pb2 as pb
from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc
from ecoserve_common.plan import TokenLogprob
from ecoserve_common.sampling import InvalidSampling, SamplingParams  # noqa: F401 (re-exported)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
MAX_SLO_MS = 86_400_000  # an SLO target's bound (the scheduler's live/slo.py)


class EcoServeError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, if asked


@dataclass(frozen=True)
class Chunk:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # empty until the last chunk
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, if asked


def _request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    request_id: str = "",
    logprobs: int | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    min_tokens: int = 0,
    slo_class: str = "",
    ttft_ms: int = 0,
    tpot_ms: int = 0,
    deadline_ms: int = 0,
) -> pb.GenerateRequest:
    """The GenerateRequest every call sends: give `prompt` text or `token_ids`; an unknown
    keyword is a TypeError, an out-of-range sampling value an InvalidSampling (a ValueError
    naming the field) before anything is sent: the contract's one validation. `logprobs=N`
    returns each token's logprob and its N most likely alternatives (Completion.logprobs,
    Chunk.logprobs); the penalties and min_tokens are as in ecoserve_common.sampling. The latency
    SLO: `slo_class` (one the server configures: its targets) and/or explicit `ttft_ms`,
    `tpot_ms`, `deadline_ms` (integers in [1, 86400000]; 0: not given) that override the class's;
    none: the server's default class. The server checks the class (INVALID_ARGUMENT naming it)."""
    for name, ms in (("ttft_ms", ttft_ms), ("tpot_ms", tpot_ms), ("deadline_ms", deadline_ms)):
        if not isinstance(ms, int) or isinstance(ms, bool) or not 0 <= ms <= MAX_SLO_MS:
            raise InvalidSampling(name, f"{name} must be an integer in [1, {MAX_SLO_MS}] (0: none)")
    sp = SamplingParams.checked(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_token_ids=stop_token_ids,
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty,
        min_tokens=min_tokens,
    )
    return pb.GenerateRequest(
        prompt=prompt or "",
        prompt_token_ids=list(token_ids or ()),
        max_tokens=sp.max_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        has_seed=sp.seed is not None,
        seed=sp.seed or 0,
        stop_token_ids=list(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        request_id=request_id,
        has_logprobs=sp.logprobs is not None,
        logprobs=sp.logprobs or 0,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty,
        min_tokens=sp.min_tokens,
        slo_class=slo_class,
        ttft_ms=ttft_ms,
        tpot_ms=tpot_ms,
        deadline_ms=deadline_ms,
    )


def _logprobs(ms) -> list[TokenLogprob]:
    return [
        TokenLogprob(
            m.token_id, m.logprob, tuple(zip(m.top_token_ids, m.top_logprobs, strict=True))
        )
        for m in ms
    ]


def _completion(r: pb.CompleteResponse) -> Completion:
    return Completion(
        r.request_id,
        r.text,
        list(r.token_ids),
        r.finish_reason,
        r.prompt_tokens,
        _logprobs(r.logprobs),
    )


def _chunk(c: pb.GenerateChunk) -> Chunk:
    return Chunk(c.request_id, c.text, list(c.token_ids), c.finish_reason, _logprobs(c.logprobs))


def _error(e: grpc.RpcError) -> EcoServeError:
    return EcoServeError(e.code(), e.details() or "")


class _Base:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.1,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _delay(self, attempt: int) -> float:
        return self.backoff_s * (2**attempt)


class Client(_Base):
    def __init__(self, address: str = "127.0.0.1:50051", **kw) -> None:
        super().__init__(address, **kw)
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.SchedulerStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request):
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise _error(e) from None
                time.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    def complete(self, prompt: str | None = None, **kw) -> Completion:
        """One whole response; keywords as `_request` (token_ids, max_tokens, ...)."""
        return _completion(self._call(self._stub.Complete, _request(prompt, **kw)))

    def generate(self, prompt: str | None = None, **kw) -> Iterator[Chunk]:
        """Chunks as they are generated; keywords as `_request`."""
        req = _request(prompt, **kw)
        for attempt in range(self.retries + 1):
            got_any = False
            try:
                for c in self._stub.Generate(req, timeout=self.timeout_s, metadata=self._metadata):
                    got_any = True
                    yield _chunk(c)
                return
            except grpc.RpcError as e:
                if got_any or e.code() not in RETRYABLE or attempt == self.retries:
                    raise _error(e) from None
                time.sleep(self._delay(attempt))

    def cancel(self, request_id: str) -> bool:
        return self._call(self._stub.Cancel, pb.CancelRequest(request_id=request_id)).found

    def get_request(self, request_id: str) -> dict:
        r = self._call(self._stub.GetRequest, pb.GetRequestRequest(request_id=request_id))
        return {f.name: v for f, v in r.ListFields()}

    def stats(self) -> dict:
        return json.loads(self._call(self._stub.Stats, pb.StatsRequest()).json)


class AsyncClient(_Base):
    """The same calls for asyncio (grpc.aio); create it inside a running event loop."""

    def __init__(self, address: str = "127.0.0.1:50051", **kw) -> None:
        super().__init__(address, **kw)
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.SchedulerStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request):
        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise _error(e) from None
                await asyncio.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    async def complete(self, prompt: str | None = None, **kw) -> Completion:
        return _completion(await self._call(self._stub.Complete, _request(prompt, **kw)))

    async def generate(self, prompt: str | None = None, **kw) -> AsyncIterator[Chunk]:
        req = _request(prompt, **kw)
        for attempt in range(self.retries + 1):
            got_any = False
            try:
                call = self._stub.Generate(req, timeout=self.timeout_s, metadata=self._metadata)
                async for c in call:
                    got_any = True
                    yield _chunk(c)
                return
            except grpc.RpcError as e:
                if got_any or e.code() not in RETRYABLE or attempt == self.retries:
                    raise _error(e) from None
                await asyncio.sleep(self._delay(attempt))

    async def cancel(self, request_id: str) -> bool:
        r = await self._call(self._stub.Cancel, pb.CancelRequest(request_id=request_id))
        return r.found

    async def stats(self) -> dict:
        return json.loads((await self._call(self._stub.Stats, pb.StatsRequest())).json)
