"""What every client interface (gRPC, OpenAI-compatible HTTP) does with one request.

`start` validates (Rejected "invalid" with the reason), applies admission control (Rejected
"exhausted" when `max_pending` requests are already in the system, "unavailable" at once while
no worker is registered unless `queue_without_workers`), asks the predictor, records
the request in the store and submits it; `follow` yields its tokens until it ends and records
the end. A deadline that passes aborts the request (the engine frees its KV blocks in its next
iteration) and raises TimeoutError. The store is a RequestStore (written from the caller's
thread) or, as `serve` runs it, a StoreWriter (queued, written in batches by its own thread);
never from the engine loop.

Admission is one atomic check-and-increment (`admit`): requests in the engine plus those being
started never exceed `max_pending`, however many threads start requests at once, and a refusal
costs no tokenizing or predicting. An edge may `admit` first (the HTTP API does, on its event
loop, so a 429 is immediate) and hand the Admission to `start`; `start` admits by itself
otherwise. Either way the Admission is released once the engine holds the request (or it was
refused).

The store never costs a client its request: a store call that fails is logged and counted
(`store_errors`) and the request goes on. Only a duplicate request id refuses a request
(Rejected "exists", a message without database text). Every row the Frontend adds ends
terminal: `follow` / `follow_text` (and the HTTP API's async streams) record the end however
the caller stops reading (follow.py). With `store_prompts=False` rows carry token counts and
no prompt text.

Sampling parameters arrive already built and checked (`SamplingParams.checked` at each edge);
`start` validates them again (InvalidSampling, a ValueError naming the field) so nothing bad
reaches the engine whoever builds a GenerateParams. The request id is minted at the edge (see
ecoserve_common.ids); `start` mints one only for a caller that gave none. Two clocks: the
Request handed to the core carries `time.monotonic()` seconds (the engine's clock, the one the
core's `now` comes from); the store gets wall-clock `time.time()` seconds, for people.

End of sequence: the Request carries the tokenizer's `eos_token_id`; a model with several
(`eos_token_ids`, e.g. generation_config.json's list) has the others added to the request's
`stop_token_ids` unless `ignore_eos`, so the core stops at each. `follow_text` is the text
path: incremental detokenization, the ending stop/EOS token left out of the text, and `stop`
strings (see detokenize.TextStream) that end the request early: the engine aborts it and the
store records it finished, with the tokens up to the stop string.

Latency SLOs (slo.py): `start` resolves what the request asked for (`GenerateParams.slo`: a
class, explicit targets, or neither: the default class) against `slo_classes`, InvalidSlo
naming the field when it cannot. The core's Request carries it as `SLO(jct_deadline_s, ttft_s,
tpot_s)`, the deadline absolute on the core's clock, counted from `received_s` (when the edge
received the request); the handle keeps the class and targets, and the request's end is counted
per class in `slo_ledger` (Follow.finish -> `record_slo`): what /metrics and /stats export.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from ecoserve_common.ids import new_request_id
from ecoserve_common.sampling import SamplingParams

from ..core.request import SLO, Request
from ..store import is_duplicate
from .engine import LiveEngine, RequestHandle
from .engine_client import EngineClient
from .follow import Follow, Piece, TextFollow
from .limits import ApiLimits, Rejected, length_problem, prompt_ids
from .prediction import PredictorClient
from .slo import RequestSlo, SloAsk, SloClasses, SloLedger

log = logging.getLogger(__name__)

__all__ = ["Admission", "ApiLimits", "Frontend", "GenerateParams", "Rejected"]

RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class GenerateParams:
    """One request as an edge hands it over: the prompt (text or token ids), its sampling
    parameters (the contract's one definition) and the id the edge minted or took."""

    prompt: str = ""
    prompt_token_ids: Sequence[int] = ()
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=16))
    request_id: str = ""
    stop: tuple[str, ...] = ()  # OpenAI's stop strings: `follow_text` ends the text at one
    # No cap given (OpenAI chat's default): max_tokens becomes the room the prompt leaves in
    # the context (vLLM's choice), once the prompt's length is known.
    fill_context: bool = False
    slo: SloAsk = field(default_factory=SloAsk)  # the latency SLO asked for (slo.py)
    # When the edge received the request, on the Frontend's clock (None: when `start` runs):
    # the SLO's deadline and the TTFT it counts run from here.
    received_s: float | None = None
    # A chat request's earlier assistant answers, in tokens, oldest first: the predictor
    # blends the previous answer's length into its guess (issue 20). Empty for a completion.
    history: tuple[int, ...] = ()


class Admission:
    """Room for one request, reserved by `Frontend.admit`; `release` (idempotent) gives it back
    once the engine counts the request, or it was refused."""

    def __init__(self, frontend: Frontend) -> None:
        self._frontend: Frontend | None = frontend

    def release(self) -> None:
        frontend, self._frontend = self._frontend, None
        if frontend is not None:
            frontend._unadmit()


class Frontend:
    def __init__(
        self,
        engine: LiveEngine | EngineClient,
        tokenizer,
        store=None,
        limits: ApiLimits | None = None,
        predictor: PredictorClient | None = None,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
        store_prompts: bool = True,
        slo_classes: SloClasses | None = None,
    ) -> None:
        """`clock` times requests for the core: by default the engine's (monotonic) clock.
        `wall_clock` stamps the store's rows. `store_prompts=False` stores no prompt text.
        `slo_classes`: the SLO classes requests may name and the default one (settings
        `slo_classes`, `default_slo_class`); None: no classes, only explicit targets."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.store = store
        self.limits = limits or ApiLimits()
        self.predictor = predictor or PredictorClient(None)
        self.clock = clock or getattr(engine, "clock", None) or time.monotonic
        self.wall_clock = wall_clock
        self.store_prompts = store_prompts
        self.slo_classes = slo_classes or SloClasses()
        self.slo_ledger = SloLedger(self.slo_classes.names)  # per class: requests, met, misses
        self.store_errors = 0  # store calls that failed (logged; the requests went on)
        self.rejected = 0  # requests refused as over capacity
        self._admit_lock = threading.Lock()
        self._starting = 0  # admitted, not yet in the engine's `pending`

    def admit(self) -> Admission:
        """Reserve room for one request at once, or raise Rejected("exhausted"): the engine's
        pending requests plus those being started never exceed `max_pending`."""
        with self._admit_lock:
            held = self.engine.pending + self._starting
            if held >= self.limits.max_pending:
                self.rejected += 1
                raise Rejected(
                    "exhausted",
                    f"{held} requests in the system (limit {self.limits.max_pending}); "
                    f"retry after {RETRY_AFTER_S:g} s",
                )
            self._starting += 1
        return Admission(self)

    def _unadmit(self) -> None:
        with self._admit_lock:
            self._starting -= 1

    def start(
        self, p: GenerateParams, admission: Admission | None = None
    ) -> tuple[RequestHandle, int]:
        """Raises Rejected, or InvalidSampling for a bad sampling parameter. `admission`: room
        the caller reserved with `admit` (released here whatever happens)."""
        received = self.clock() if p.received_s is None else p.received_s
        try:
            p.sampling.validate()  # the caller's fields, before the model's EOS ids join them
            slo = self.slo_classes.resolve(p.slo)  # InvalidSlo naming the field
            sampling = self.with_eos(p.sampling)
            ids = self.prompt_ids(p)
            if p.fill_context:
                room = max(1, self.limits.max_model_len - len(ids))
                sampling = replace(sampling, max_tokens=max(room, sampling.min_tokens))
            problem = length_problem(self.limits, len(ids), sampling.max_tokens)
            if problem:
                raise Rejected("invalid", problem)
            if not self.limits.queue_without_workers and not self.engine.worker_ids():
                raise Rejected(
                    "unavailable",
                    "no worker is registered (starting or restarting); "
                    f"retry after {RETRY_AFTER_S:g} s",
                )
            admission = admission or self.admit()
            return self._submit(p, sampling, ids, slo, received), len(ids)
        finally:
            if admission is not None:
                admission.release()

    def _submit(
        self,
        p: GenerateParams,
        sampling: SamplingParams,
        ids: list[int],
        slo: RequestSlo | None,
        received: float,
    ) -> RequestHandle:
        rid = p.request_id or new_request_id()
        text = p.prompt or self.tokenizer.decode(ids)
        guess = self.predictor.predict(text, p.history)
        cap = sampling.max_tokens
        predicted = min(guess.point, cap)
        req = Request(
            rid,
            len(ids),
            self.clock(),  # after the predictor's call: the core's clock, read last
            sampling,
            slo=slo.targets.core_slo(received, predicted) if slo is not None else SLO(),
            prompt_token_ids=tuple(ids),
            eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
            predicted_rl=predicted,
            predicted_rl_upper=min(guess.upper, cap),
        )
        added = False
        if self.store is not None:
            stored = text if self.store_prompts else ""
            try:
                self.store.add(
                    rid, stored, len(ids), cap, self.wall_clock(), predicted_tokens=guess.point
                )
                added = True
            except Exception as exc:
                if is_duplicate(exc):  # refused before anything runs; no database text
                    raise Rejected("exists", f"request_id {rid!r} is already in use") from None
                self._store_failed("add", rid, exc)
        try:
            handle = self.engine.submit(req)
        except Exception:
            if added:
                self.store_call("fail", rid, "failed: not submitted", self.wall_clock())
            raise
        handle.slo, handle.received_s = slo, received  # read when the request ends
        return handle

    def following(self, handle: RequestHandle, timeout_s: float | None = None) -> Follow:
        """A reader of `handle`'s events that records the end (see follow.py)."""
        return Follow(self, handle, timeout_s)

    def text_of(
        self, follow: Follow, sampling: SamplingParams, stop: Sequence[str] = ()
    ) -> TextFollow:
        """The text path over `follow`: the tokens that end the request add no text."""
        ending = set(self.with_eos(sampling).stop_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and not sampling.ignore_eos:
            ending.add(eos)
        return TextFollow(follow, self.tokenizer, ending, stop)

    def follow(
        self, handle: RequestHandle, timeout_s: float | None = None
    ) -> Iterator[tuple[list[int], str | None]]:
        """(new tokens, None) as they come, then ([], finish reason); records the end, also
        when the caller stops early (aborted) or the deadline passes (TimeoutError).

        Tokens already queued when the caller comes back are handed over together: a reader
        that falls behind (a busy thread pool) catches up in one hop, not one per token.
        """
        f = self.following(handle, timeout_s)
        try:
            while True:
                tokens, finish = f.take(f.next_events())
                if finish:
                    f.finish(finish)  # before anything is handed on: the caller may stop
                if tokens:
                    yield tokens, None
                if finish:
                    yield [], finish
                    return
        except Exception as exc:
            f.close(f"failed: {type(exc).__name__}")
            raise
        finally:
            f.close()

    def follow_text(
        self,
        handle: RequestHandle,
        sampling: SamplingParams,
        stop: tuple[str, ...] = (),
        timeout_s: float | None = None,
    ) -> Iterator[Piece]:
        """(new text, None, tokens so far) as it becomes final, then ("", finish reason, tokens).

        A token that ends the request (an EOS unless `ignore_eos`, or one of `stop_token_ids`)
        adds no text. A stop string ends it with "stop": the text before it is the last,
        the engine aborts the request and the store records it finished."""
        f = self.following(handle, timeout_s)
        text = self.text_of(f, sampling, stop)
        try:
            while f.ended is None:
                yield from text.feed(*f.take(f.next_events()))
        finally:
            f.close()

    def with_eos(self, sampling: SamplingParams) -> SamplingParams:
        """`sampling` with the model's other EOS ids among its stop ids (unless ignore_eos)."""
        ids = getattr(self.tokenizer, "eos_token_ids", None)
        ids = list(ids) if isinstance(ids, (list, tuple)) else []  # transformers': maybe an int
        extra = [i for i in ids[1:] if i not in sampling.stop_token_ids]
        if sampling.ignore_eos or not extra:
            return sampling
        return dataclasses.replace(
            sampling, stop_token_ids=tuple(sampling.stop_token_ids) + tuple(extra)
        )

    def cancel(self, request_id: str) -> None:
        self.engine.cancel(request_id)

    def stats(self) -> dict:
        """The core's and the engine's stats, requests pending and the predictor's counts."""
        pred = self.predictor
        out = {
            **self.engine.stats_snapshot,
            "pending": self.engine.pending,
            "predictor": {"calls": pred.calls, "failures": pred.failures},
            "frontend": {"store_errors": self.store_errors, "rejected": self.rejected},
        }
        if hasattr(self.store, "stats"):  # a StoreWriter: its write counters
            out["store"] = self.store.stats()
        out["slo"] = self.slo_stats()
        return out

    def slo_stats(self) -> dict:
        """Per SLO class: its targets (s) and the counts so far (requests that ended with an
        SLO, met, missed_<target>), plus the default class."""
        targets = self.slo_classes.as_dict()
        counts = self.slo_ledger.snapshot()
        return {
            "default_class": self.slo_classes.default,
            "classes": {n: {"targets": targets.get(n, {}), **c} for n, c in counts.items()},
        }

    def record_slo(
        self, handle: RequestHandle, reason: str, tokens: int, first_s: float | None
    ) -> None:
        """Count a request's end against its SLO class (slo.py: what "met" means). A request
        without an SLO, or aborted (its client left or its deadline passed), is not counted."""
        slo = handle.slo
        if slo is None or reason == "aborted":
            return
        if reason not in ("stop", "length"):
            self.slo_ledger.record(slo.slo_class, ("failed",))
            return
        end, t0 = self.clock(), handle.received_s
        ttft = None if first_s is None else first_s - t0
        tpot = (end - first_s) / (tokens - 1) if first_s is not None and tokens > 1 else None
        self.slo_ledger.record(slo.slo_class, slo.targets.misses(ttft, tpot, end - t0))

    def record_end(self, rid: str, reason: str, n: int) -> None:
        now = self.wall_clock()
        if reason in ("stop", "length"):
            self.store_call("finish", rid, n, now)
        elif reason == "aborted":
            self.store_call("abort", rid, now)
        else:
            self.store_call("fail", rid, reason, now)

    def store_call(self, verb: str, rid: str, *args) -> None:
        """`store.<verb>(rid, *args)`; a failure is logged and counted, never raised: the
        request goes on for its client whatever the store does."""
        if self.store is None:
            return
        try:
            getattr(self.store, verb)(rid, *args)
        except Exception as exc:
            self._store_failed(verb, rid, exc)

    def _store_failed(self, verb: str, rid: str, exc: Exception) -> None:
        self.store_errors += 1
        # The type and first line only: a driver's message can carry SQL and prompt text.
        first = (str(exc).splitlines() or [""])[0][:200]
        log.warning("store %s of request %r failed: %s: %s", verb, rid, type(exc).__name__, first)

    def prompt_ids(self, p: GenerateParams) -> list[int]:
        """The prompt's token ids, checked (limits.prompt_ids). An edge that starts one prompt
        several times (n choices) tokenizes once with it."""
        return prompt_ids(self.limits, self.tokenizer, p.prompt, p.prompt_token_ids)
