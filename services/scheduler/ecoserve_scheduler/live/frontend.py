"""What every client interface (gRPC, OpenAI-compatible HTTP) does with one request.

`start` validates (Rejected "invalid" with the reason), applies admission control (Rejected
"exhausted" when `max_pending` requests are already in the system), asks the predictor, records
the request in the store and submits it; `follow` yields its tokens until it ends and records
the end. A deadline that passes aborts the request (the engine frees its KV blocks in its next
iteration) and raises TimeoutError. The store is a RequestStore (written from the caller's
thread) or, as `serve` runs it, a StoreWriter (queued, written in batches by its own thread);
never from the engine loop.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ecoserve_common.ids import new_request_id
from ecoserve_common.sampling import SamplingParams

from ..core.events import FinishEvent, TokenEvent
from ..core.request import Request
from .detokenize import TextStream
from .engine import LiveEngine, RequestHandle
from .engine_client import EngineClient
from .prediction import PredictorClient

RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class ApiLimits:
    max_model_len: int = 4096  # prompt + max_tokens
    max_pending: int = 1024  # requests in the system before new ones are refused
    vocab_size: int | None = None  # token ids must be below it when known


@dataclass(frozen=True)
class GenerateParams:
    """One request as an edge hands it over: the prompt (text or token ids), its sampling
    parameters (the contract's one definition) and the id the edge minted or took."""

    prompt: str = ""
    prompt_token_ids: Sequence[int] = ()
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=16))
    request_id: str = ""
    stop: tuple[str, ...] = ()  # OpenAI's stop strings: `follow_text` ends the text at one


class Rejected(Exception):
    """A request refused before it ran: code "invalid", "exhausted" or "exists"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
    ) -> None:
        """`clock` times requests for the core: by default the engine's (monotonic) clock.
        `wall_clock` stamps the store's rows."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.store = store
        self.limits = limits or ApiLimits()
        self.predictor = predictor or PredictorClient(None)
        self.clock = clock or getattr(engine, "clock", None) or time.monotonic
        self.wall_clock = wall_clock

    def start(self, p: GenerateParams) -> tuple[RequestHandle, int]:
        """Raises Rejected, or InvalidSampling for a bad sampling parameter."""
        sampling = self.with_eos(p.sampling)
        sampling.validate()
        ids = self._prompt_ids(p)
        problem = self._check_length(len(ids), sampling.max_tokens)
        if problem:
            raise Rejected("invalid", problem)
        if self.engine.pending >= self.limits.max_pending:
            raise Rejected(
                "exhausted",
                f"{self.engine.pending} requests in the system (limit "
                f"{self.limits.max_pending}); retry after {RETRY_AFTER_S:g} s",
            )
        rid = p.request_id or new_request_id()
        text = p.prompt or self.tokenizer.decode(ids)
        guess = self.predictor.predict(text)
        cap = sampling.max_tokens
        req = Request(
            rid,
            len(ids),
            self.clock(),  # after the predictor's call: the core's clock, read last
            sampling,
            prompt_token_ids=tuple(ids),
            eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
            predicted_rl=min(guess.point, cap),
            predicted_rl_upper=min(guess.upper, cap),
            rl_bucket=guess.bucket,
        )
        if self.store is not None:
            try:
                self.store.add(
                    rid, text, len(ids), cap, self.wall_clock(), predicted_tokens=guess.point
                )
            except Exception as exc:  # a duplicate id: refused before anything runs
                raise Rejected("exists", f"request {rid!r}: {exc}"[:300]) from exc
        return self.engine.submit(req), len(ids)

    def follow(
        self, handle: RequestHandle, timeout_s: float | None = None
    ) -> Iterator[tuple[list[int], str | None]]:
        """(new tokens, None) as they come, then ([], finish reason); records the end.

        Tokens already queued when the caller comes back are handed over together: a reader
        that falls behind (a busy HTTP thread pool) catches up in one hop, not one per token.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        started = False
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                events = [handle.events.get(timeout=wait)]
            except queue.Empty:
                self.engine.cancel(handle.request_id)
                self.record_end(handle.request_id, "aborted", len(handle.tokens))
                raise TimeoutError("deadline passed; request aborted") from None
            with contextlib.suppress(queue.Empty):
                while not isinstance(events[-1], FinishEvent):
                    events.append(handle.events.get_nowait())
            tokens = [ev.token_id for ev in events if isinstance(ev, TokenEvent)]
            if tokens:
                if not started and self.store is not None:
                    self.store.mark_running(handle.request_id)
                started = True
                yield tokens, None
            if isinstance(events[-1], FinishEvent):
                self.record_end(handle.request_id, events[-1].reason, len(handle.tokens))
                yield [], events[-1].reason
                return

    def follow_text(
        self,
        handle: RequestHandle,
        sampling: SamplingParams,
        stop: tuple[str, ...] = (),
        timeout_s: float | None = None,
    ) -> Iterator[tuple[str, str | None, int]]:
        """(new text, None, tokens so far) as it becomes final, then ("", finish reason, tokens).

        A token that ends the request (an EOS unless `ignore_eos`, or one of `stop_token_ids`)
        adds no text. A stop string ends it with "stop": the text before it is the last,
        the engine aborts the request and the store records it finished."""
        ending = set(self.with_eos(sampling).stop_token_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and not sampling.ignore_eos:
            ending.add(eos)
        text = TextStream(self.tokenizer, stop)
        events = self.follow(handle, timeout_s)
        try:
            for tokens, finish in events:
                if finish:
                    rest = text.flush()
                    if rest:
                        yield rest, None, len(handle.tokens)
                    yield "", finish, len(handle.tokens)
                    return
                out = text.push([t for t in tokens if t not in ending])
                if text.stopped:
                    events.close()
                    self.engine.cancel(handle.request_id)
                    self.record_end(handle.request_id, "stop", text.tokens_used)
                    if out:
                        yield out, None, text.tokens_used
                    yield "", "stop", text.tokens_used
                    return
                if out:
                    yield out, None, len(handle.tokens)
        finally:
            events.close()

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
        }
        if hasattr(self.store, "stats"):  # a StoreWriter: its write counters
            out["store"] = self.store.stats()
        return out

    def record_end(self, rid: str, reason: str, n: int) -> None:
        if self.store is None:
            return
        now = self.wall_clock()
        if reason in ("stop", "length"):
            self.store.finish(rid, n, now)
        elif reason == "aborted":
            self.store.abort(rid, now)
        else:
            self.store.fail(rid, reason, now)

    def _prompt_ids(self, p: GenerateParams) -> list[int]:
        if p.prompt and p.prompt_token_ids:
            raise Rejected("invalid", "give prompt or prompt_token_ids, not both")
        if p.prompt_token_ids:
            ids = [int(t) for t in p.prompt_token_ids]
            vocab = self.limits.vocab_size
            if vocab is not None and (max(ids) >= vocab or min(ids) < 0):
                raise Rejected("invalid", f"token ids must be in [0, {vocab})")
            return ids
        if not p.prompt.strip():
            raise Rejected("invalid", "empty prompt")
        return self.tokenizer.encode(p.prompt)

    def _check_length(self, prompt_len: int, max_tokens: int) -> str | None:
        if prompt_len + max_tokens > self.limits.max_model_len:
            return (
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"{self.limits.max_model_len}"
            )
        return None
