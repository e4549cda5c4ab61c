"""What one iteration runs (BatchPlan), what comes back (StepResult), and what it caused (events)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .request import SamplingParams


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence in one forward pass: tokens at positions [start_pos, start_pos + num_tokens)."""

    request_id: str
    start_pos: int
    num_tokens: int
    block_table: tuple[int, ...]
    sample: bool  # True when this chunk reaches the end of the known tokens
    sampling: SamplingParams
    token_ids: tuple[int, ...] | None = None  # None in the simulator

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.start_pos > 0 and self.sample


@dataclass(frozen=True)
class BatchShape:
    """The numbers a cost model needs: prefill chunks as (chunk_tokens, context_before_chunk)."""

    prefill_chunks: tuple[tuple[int, int], ...] = ()
    decode_seqs: int = 0
    decode_context_tokens: int = 0  # sum over decode sequences of the context they attend to

    @property
    def prefill_tokens(self) -> int:
        return sum(c for c, _ in self.prefill_chunks)

    @property
    def total_tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs


@dataclass(frozen=True)
class BatchPlan:
    step_id: int
    worker_id: str
    seqs: tuple[ScheduledSeq, ...]
    # Block moves the worker performs before the forward pass (KVCPipe guest relocation).
    block_copies: tuple[tuple[int, int], ...] = ()
    # Requests whose worker-side state (if any) can be dropped.
    dropped: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    def shape(self) -> BatchShape:
        chunks: list[tuple[int, int]] = []
        decode_seqs = 0
        decode_ctx = 0
        for s in self.seqs:
            if s.is_decode:
                decode_seqs += 1
                decode_ctx += s.start_pos + 1
            else:
                chunks.append((s.num_tokens, s.start_pos))
        return BatchShape(tuple(chunks), decode_seqs, decode_ctx)


@dataclass(frozen=True)
class StepResult:
    step_id: int
    worker_id: str
    # request_id -> sampled token, for every sequence whose ScheduledSeq had sample=True.
    sampled: dict[str, int] = field(default_factory=dict)
    forward_s: float = 0.0
    error: str | None = None


# ---- events returned by SchedulerCore.apply / abort -------------------------------------------


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int
    index: int  # 0 = first output token


@dataclass(frozen=True)
class FinishEvent:
    request_id: str
    reason: str  # "stop", "length", "aborted", or "failed: <why>"


@dataclass(frozen=True)
class PreemptEvent:
    request_id: str
    reason: str


Event = TokenEvent | FinishEvent | PreemptEvent
