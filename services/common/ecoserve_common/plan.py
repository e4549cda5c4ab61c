"""What one iteration runs (BatchPlan) and what comes back (StepResult): the scheduler builds
plans, the wire codec carries them, a worker runs them."""

from __future__ import annotations

from dataclasses import dataclass

from .sampling import SamplingParams


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
class DecodeBatch:
    """Every decoding sequence of a step, column-wise: sequence i feeds the token at position
    positions[i] and samples the next one. Kept as columns because it is the hot path: a step
    may decode a thousand sequences, and building one object per sequence per step would cost
    more than all the scheduling decisions. `block_tables[i]` is the ledger's live table; it is
    valid until the next `schedule()` of the same worker."""

    request_ids: tuple[str, ...] = ()
    positions: tuple[int, ...] = ()
    block_tables: tuple[list[int], ...] = ()
    sampling: tuple[SamplingParams, ...] = ()
    token_ids: tuple[int, ...] | None = None  # None in the simulator

    def __len__(self) -> int:
        return len(self.request_ids)


@dataclass(frozen=True)
class BatchPlan:
    step_id: int
    worker_id: str
    decodes: DecodeBatch
    prefills: tuple[ScheduledSeq, ...] = ()  # prompt chunks (and recomputes)
    # Block moves the worker performs before the forward pass (KVCPipe guest relocation).
    block_copies: tuple[tuple[int, int], ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(s.num_tokens for s in self.prefills)

    @property
    def seqs(self) -> tuple[ScheduledSeq, ...]:
        """Every sequence as a ScheduledSeq (decodes first): convenient, not for hot paths."""
        d = self.decodes
        ids = d.token_ids
        decodes = tuple(
            ScheduledSeq(rid, pos, 1, tuple(table), True, sp, (ids[i],) if ids else None)
            for i, (rid, pos, table, sp) in enumerate(
                zip(d.request_ids, d.positions, d.block_tables, d.sampling, strict=True)
            )
        )
        return decodes + self.prefills

    def sampled_ids(self) -> list[str]:
        """Request ids that sample a token this step, in the order results are expected."""
        return list(self.decodes.request_ids) + [s.request_id for s in self.prefills if s.sample]

    def shape(self) -> BatchShape:
        d = self.decodes
        chunks = tuple((s.num_tokens, s.start_pos) for s in self.prefills)
        return BatchShape(chunks, len(d), sum(d.positions) + len(d))


@dataclass(frozen=True)
class StepResult:
    step_id: int
    worker_id: str
    # One sampled token per id of plan.sampled_ids(), in that order.
    tokens: tuple[int, ...] | list[int] = ()
    forward_s: float = 0.0
    error: str | None = None
