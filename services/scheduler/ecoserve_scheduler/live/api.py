"""The scheduler's gRPC client API (proto/scheduler.proto) over a LiveEngine.

Each call is validated (INVALID_ARGUMENT with the reason), refused at once with
RESOURCE_EXHAUSTED and a retry hint when `max_pending` requests are already in the system, then
recorded in the request store, submitted, and followed on its handle until it finishes. The
store is written from the call's own thread, never from the engine loop. A client that cancels
or whose deadline passes has its request aborted: the engine frees its KV blocks in its next
iteration.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..core.plan import FinishEvent, TokenEvent
from ..core.request import Request, SamplingParams
from . import scheduler_pb2 as pb
from . import scheduler_pb2_grpc as pb_grpc
from .engine import LiveEngine, RequestHandle
from .prediction import PredictorClient

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name
RETRY_AFTER_MS = 1000


@dataclass(frozen=True)
class ApiLimits:
    max_model_len: int = 4096  # prompt + max_tokens
    max_pending: int = 1024  # requests in the system before new ones are refused
    vocab_size: int | None = None  # token ids must be below it when known


class SchedulerService(pb_grpc.SchedulerServicer):
    def __init__(
        self,
        engine: LiveEngine,
        tokenizer,
        store=None,
        limits: ApiLimits | None = None,
        predictor: PredictorClient | None = None,
        clock=time.time,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.store = store
        self.limits = limits or ApiLimits()
        self.predictor = predictor or PredictorClient(None)
        self.clock = clock

    # ---- RPCs ----------------------------------------------------------------------------

    def Generate(self, request, context) -> Iterator[pb.GenerateChunk]:
        handle, _ = self._start(request, context)
        for tokens, finish in self._follow(handle, context):
            yield pb.GenerateChunk(
                request_id=handle.request_id,
                token_ids=tokens,
                text=self.tokenizer.decode(tokens) if tokens else "",
                finish_reason=finish or "",
            )

    def Complete(self, request, context) -> pb.CompleteResponse:
        handle, prompt_len = self._start(request, context)
        for _ in self._follow(handle, context):
            pass
        return pb.CompleteResponse(
            request_id=handle.request_id,
            token_ids=handle.tokens,
            text=self.tokenizer.decode(handle.tokens),
            finish_reason=handle.finish_reason or "",
            prompt_tokens=prompt_len,
        )

    def Cancel(self, request, context) -> pb.CancelResponse:
        row = self.store.get(request.request_id) if self.store else None
        self.engine.cancel(request.request_id)
        return pb.CancelResponse(found=row is not None and row.status in ("queued", "running"))

    def GetRequest(self, request, context) -> pb.RequestInfo:
        row = self.store.get(request.request_id) if self.store else None
        if row is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request.request_id!r}")
        return pb.RequestInfo(
            request_id=row.request_id,
            status=row.status,
            prompt_tokens=row.prompt_tokens,
            response_tokens=row.response_tokens or 0,
            fail_reason=row.fail_reason or "",
            arrival_s=row.arrival_s,
            finished_s=row.finished_s or 0.0,
        )

    def Stats(self, request, context) -> pb.StatsResponse:
        snap = self.engine.stats_snapshot
        pred = self.predictor
        snap = {**snap, "predictor": {"calls": pred.calls, "failures": pred.failures}}
        return pb.StatsResponse(
            json=json.dumps(snap, sort_keys=True),
            pending=self.engine.pending,
            workers=snap.get("workers", []),
        )

    # ---- one request -----------------------------------------------------------------------

    def _start(self, m: pb.GenerateRequest, context) -> tuple[RequestHandle, int]:
        ids, problem = self._prompt_ids(m)
        problem = problem or _check_sampling(m) or self._check_length(len(ids), m.max_tokens)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if self.engine.pending >= self.limits.max_pending:
            context.set_trailing_metadata((("retry-after-ms", str(RETRY_AFTER_MS)),))
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.engine.pending} requests in the system (limit "
                f"{self.limits.max_pending}); retry after {RETRY_AFTER_MS} ms",
            )
        rid = m.request_id or uuid.uuid4().hex
        now = self.clock()
        sampling = SamplingParams(
            max_tokens=m.max_tokens,
            temperature=m.temperature,
            top_p=m.top_p or 1.0,
            top_k=m.top_k,
            seed=m.seed if m.has_seed else None,
            stop_token_ids=tuple(m.stop_token_ids),
            ignore_eos=m.ignore_eos,
        )
        text = m.prompt or self.tokenizer.decode(ids)
        guess = self.predictor.predict(text)
        req = Request(
            rid,
            len(ids),
            now,
            sampling,
            prompt_token_ids=tuple(ids),
            eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
            predicted_rl=min(guess.point, m.max_tokens),
            predicted_rl_upper=min(guess.upper, m.max_tokens),
            rl_bucket=guess.bucket,
        )
        if self.store is not None:
            try:
                self.store.add(rid, text, len(ids), m.max_tokens, now, predicted_tokens=guess.point)
            except Exception as exc:  # a duplicate id: refused before anything runs
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {rid!r}: {exc}"[:300])
        handle = self.engine.submit(req)
        context.add_callback(lambda: self.engine.cancel(rid))  # no-op once it has finished
        return handle, len(ids)

    def _follow(self, handle: RequestHandle, context):
        """(new tokens, finish reason or None) until the request ends; records the end."""
        started = False
        while True:
            remaining = context.time_remaining()
            try:
                ev = handle.events.get(timeout=None if remaining is None else max(remaining, 0))
            except queue.Empty:
                self.engine.cancel(handle.request_id)
                self._record_end(handle.request_id, "aborted", len(handle.tokens))
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed; aborted")
            if isinstance(ev, TokenEvent):
                if not started and self.store is not None:
                    self.store.mark_running(handle.request_id)
                started = True
                yield [ev.token_id], None
            elif isinstance(ev, FinishEvent):
                self._record_end(handle.request_id, ev.reason, len(handle.tokens))
                yield [], ev.reason
                return

    def _record_end(self, rid: str, reason: str, n: int) -> None:
        if self.store is None:
            return
        now = self.clock()
        if reason in ("stop", "length"):
            self.store.finish(rid, n, now)
        elif reason == "aborted":
            self.store.abort(rid, now)
        else:
            self.store.fail(rid, reason, now)

    def _prompt_ids(self, m: pb.GenerateRequest) -> tuple[list[int], str | None]:
        if m.prompt and m.prompt_token_ids:
            return [], "give prompt or prompt_token_ids, not both"
        if m.prompt_token_ids:
            ids = list(m.prompt_token_ids)
            vocab = self.limits.vocab_size
            if vocab is not None and max(ids) >= vocab:
                return [], f"token id {max(ids)} outside the vocabulary of {vocab}"
            return ids, None
        if not m.prompt.strip():
            return [], "empty prompt"
        return self.tokenizer.encode(m.prompt), None

    def _check_length(self, prompt_len: int, max_tokens: int) -> str | None:
        if max_tokens <= 0:
            return f"max_tokens must be > 0 (got {max_tokens})"
        if prompt_len + max_tokens > self.limits.max_model_len:
            return (
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"{self.limits.max_model_len}"
            )
        return None


def _check_sampling(m: pb.GenerateRequest) -> str | None:
    if m.temperature < 0:
        return f"temperature must be >= 0 (got {m.temperature})"
    if not 0.0 <= m.top_p <= 1.0:
        return f"top_p must be in (0, 1] (got {m.top_p})"
    if m.top_k < 0:
        return f"top_k must be >= 0 (got {m.top_k})"
    return None


def build_server(service: SchedulerService, address: str, workers: int = 64):
    """(server, port) with the Scheduler service, health checking and reflection; not started."""
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_SchedulerServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return server, port
