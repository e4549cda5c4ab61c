"""gRPC Predictor service: micro-batched, deadline-aware, with health checking and reflection.

Each Predict call is validated, then queued with its deadline. One batcher thread owns the
model: it takes every call waiting (up to `max_batch` prompts; with `max_wait_s` > 0 it also
holds the batch open that long for more), drops calls whose deadline has passed, runs one ONNX
Runtime batch for the rest and hands each call its slice. By default it does not wait: calls
that arrive while a batch runs form the next one, so a lone call pays no batching delay and a
loaded server still batches. A call that waits past its deadline gets DEADLINE_EXCEEDED; no
call is ever left without an answer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import grpc

from ecoserve_common.grpc_server import build_grpc_server
from ecoserve_common.pb import predictor_pb2 as pb
from ecoserve_common.pb import predictor_pb2_grpc as pb_grpc

from .runtime import OnnxPredictor, Predictions

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Predictor"].full_name
MAX_PROMPTS = 256  # per call
MAX_PROMPT_CHARS = 200_000  # ShareGPT's longest prompt is ~160k tokens of mostly short words
MAX_HISTORY_TURNS = 1024  # earlier answers per prompt (the blend reads the last and the mean)


@dataclass
class _Call:
    prompts: list[str]
    deadline: float | None  # monotonic
    histories: list[list[int]] | None = None  # one per prompt: earlier answers' token counts
    done: threading.Event = field(default_factory=threading.Event)
    result: Predictions | None = None
    offset: int = 0
    error: str | None = None


class Batcher:
    """Collects concurrent calls into one model batch (a single worker thread owns the model)."""

    def __init__(self, predictor: OnnxPredictor, max_batch: int = 64, max_wait_s: float = 0.0):
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Call | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="predict-batcher", daemon=True)
        self.batches = 0  # counters for tests and metrics
        self.expired = 0
        self._thread.start()

    def submit(self, call: _Call) -> None:
        self._queue.put(call)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            calls, size = [first], len(first.prompts)
            wait_until = time.monotonic() + self.max_wait_s
            stop = False
            while size < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, wait_until - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                calls.append(nxt)
                size += len(nxt.prompts)
            self._serve(calls)
            if stop:
                return

    def _serve(self, calls: list[_Call]) -> None:
        now = time.monotonic()
        live = []
        for c in calls:
            if c.deadline is not None and c.deadline <= now:
                c.error = "deadline passed while queued"
                self.expired += 1
                c.done.set()
            else:
                live.append(c)
        if not live:
            return
        prompts = [p for c in live for p in c.prompts]
        histories = None  # a batch reads history only if some call sent it
        if any(c.histories for c in live):
            histories = [h for c in live for h in (c.histories or [[] for _ in c.prompts])]
        try:
            result = self.predictor.predict(prompts, histories)
        except Exception as exc:  # a model failure fails these calls, not the service
            log.exception("predict batch failed")
            for c in live:
                c.error = f"internal: {type(exc).__name__}: {exc}"
                c.done.set()
            return
        self.batches += 1
        offset = 0
        for c in live:
            c.result, c.offset = result, offset
            offset += len(c.prompts)
            c.done.set()


class PredictorService(pb_grpc.PredictorServicer):
    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.predictor = batcher.predictor

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext):
        prompts = list(request.prompts)
        histories = [list(h.answer_tokens) for h in request.histories] or None
        problem = _validate(prompts) or _validate_histories(histories, len(prompts))
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        call = _Call(prompts, deadline, histories)
        self.batcher.submit(call)
        if not call.done.wait(timeout=remaining):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the batch ran")
        if call.error:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            if call.error.startswith("internal"):
                code = grpc.StatusCode.INTERNAL
            context.abort(code, call.error)
        r, a = call.result, call.offset
        b = a + len(prompts)
        return pb.PredictResponse(
            predictions=[
                pb.Prediction(point_tokens=float(p), upper_tokens=float(u), bucket=int(k))
                for p, u, k in zip(r.point[a:b], r.upper[a:b], r.bucket[a:b], strict=True)
            ],
            model_id=self.predictor.model_id,
            bucket_edges=self.predictor.edges,
        )


def _validate(prompts: list[str]) -> str | None:
    if not prompts:
        return "no prompts: send at least one"
    if len(prompts) > MAX_PROMPTS:
        return f"{len(prompts)} prompts in one call; at most {MAX_PROMPTS}"
    for i, p in enumerate(prompts):
        if not p.strip():
            return f"prompt {i} is empty"
        if len(p) > MAX_PROMPT_CHARS:
            return f"prompt {i} has {len(p)} characters; at most {MAX_PROMPT_CHARS}"
    return None


def _validate_histories(histories: list[list[int]] | None, n: int) -> str | None:
    if histories is None:
        return None
    if len(histories) != n:
        return f"{len(histories)} histories for {n} prompts: send none or one per prompt"
    for i, h in enumerate(histories):
        if len(h) > MAX_HISTORY_TURNS:
            return f"history {i} has {len(h)} answers; at most {MAX_HISTORY_TURNS}"
    return None


def build_server(
    predictor: OnnxPredictor,
    address: str = "127.0.0.1:50061",
    max_batch: int = 64,
    max_wait_s: float = 0.0,
    workers: int = 16,
) -> tuple[grpc.Server, int, Batcher]:
    """A started-ready (not yet started) server with Predictor, health and reflection; returns
    (server, bound port, batcher)."""
    batcher = Batcher(predictor, max_batch, max_wait_s)
    service = PredictorService(batcher)
    server, port = build_grpc_server(
        lambda srv: pb_grpc.add_PredictorServicer_to_server(service, srv),
        SERVICE_NAME,
        address,
        workers,
    )
    return server, port, batcher
