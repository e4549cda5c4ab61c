"""What one iteration runs (BatchPlan) and what comes back (StepResult): the scheduler builds
plans, the wire codec carries them, a worker runs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .sampling import SamplingParams


class TokenLogprob(NamedTuple):
    """One sampled token's logprob and the `top` most likely tokens at its position as
    (token id, logprob) pairs, most likely first (as many as the request's `logprobs` asked,
    fewer only if the vocabulary is smaller). Logprobs are of the model's raw distribution:
    log_softmax of the logits before penalties, temperature and top-k/top-p (vLLM v1's default).
    A NamedTuple: it crosses a process boundary pickled with every token event."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    prompt_len: int = 0  # the request's: a worker tells outputs from prompt with it


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
    prompt_lens: tuple[int, ...] | None = None  # each request's; None in the simulator

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
        ids, lens = d.token_ids, d.prompt_lens
        decodes = tuple(
            ScheduledSeq(
                rid,
                pos,
                1,
                tuple(table),
                True,
                sp,
                (ids[i],) if ids else None,
                lens[i] if lens else 0,
            )
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
    """A step's outcome. `error` set: the whole step failed, `tokens` is empty. Otherwise one
    token per id of plan.sampled_ids(), in that order; `failed` lists (request_id, reason) for
    rows whose sampling alone failed: those requests fail, their entry in `tokens` is a
    placeholder, and every other row's token stands. `logprobs` is empty when no row asked for
    them, else one entry per token: its TokenLogprob, None for a row that did not ask."""

    step_id: int
    worker_id: str
    tokens: tuple[int, ...] | list[int] = ()
    forward_s: float = 0.0
    error: str | None = None
    failed: tuple[tuple[str, str], ...] = ()
    logprobs: tuple[TokenLogprob | None, ...] | list[TokenLogprob | None] = ()


@dataclass(frozen=True)
class StepInputs:
    """A plan as a worker runs it: flat columns, one row per sequence (the plan's decode rows
    first, then its prefill chunks), built once from the wire (`wire.step_inputs_from_proto`)
    or from a BatchPlan (`from_plan`) and read by the model runner and the sampler as they are.

    Row r feeds `token_ids[tok_off[r] : tok_off[r] + query_len(r)]` at positions starting at
    `positions[r]`; its block table is `block_ids[tbl_off[r] : tbl_off[r] + table_lens[r]]`.
    Offsets are not stored: the runner walks the rows once and accumulates them."""

    step_id: int
    worker_id: str
    request_ids: list[str]  # per row
    positions: list[int]  # per row: the position of its first new token
    token_ids: list[int]  # every row's new tokens, concatenated
    table_lens: list[int]  # per row
    block_ids: list[int]  # every row's block table, concatenated
    # The rows that sample a token this step, in result order, each with an index into
    # `sampling_sets` (the step's distinct settings: "all greedy" is a check of a few sets).
    sampling_sets: list[SamplingParams]
    sampling_index: list[int]  # per sampling row
    num_decodes: int  # leading rows that came from the plan's DecodeBatch
    # Per row token counts; None when every row feeds one token (a pure decode step).
    query_lens: list[int] | None = None
    # Sampling rows; None when every row samples (then sampling_index has one entry per row).
    sample_rows: list[int] | None = None
    block_copies: list[tuple[int, int]] | tuple[tuple[int, int], ...] = ()
    # What penalties and min_tokens need (None when no row's sampling does, the common case):
    # each row's request's prompt length, and the rows (sampling or not, in row order) whose
    # request is penalized, so the sampler can keep those requests' tokens (worker sampling.py).
    prompt_lens: list[int] | None = None
    history_rows: list[int] | None = None

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def sampled_ids(self) -> list[str]:
        """Request ids that sample a token this step, in the order results are expected."""
        if self.sample_rows is None:
            return list(self.request_ids)
        return [self.request_ids[r] for r in self.sample_rows]

    def row_end(self, r: int) -> int:
        """Tokens of row r's request known once the row is fed: its last position + 1."""
        return self.positions[r] + (1 if self.query_lens is None else self.query_lens[r])

    def shape(self) -> BatchShape:
        """The same BatchShape as the plan's: its prefill chunks and decode rows."""
        nd = self.num_decodes
        lens = self.query_lens
        chunks = tuple(
            (lens[r] if lens is not None else 1, self.positions[r]) for r in range(nd, len(self))
        )
        return BatchShape(chunks, nd, sum(self.positions[:nd]) + nd)

    @classmethod
    def from_plan(cls, plan: BatchPlan) -> StepInputs:
        """The columns of an in-process plan (a simulator plan, without token ids, has none)."""
        d = plan.decodes
        nd = len(d)
        if nd and d.token_ids is None:
            raise ValueError("plan has no decode token ids (a simulator plan cannot run a model)")
        rids = list(d.request_ids)
        positions = list(d.positions)
        tokens = list(d.token_ids or ())
        table_lens = [len(t) for t in d.block_tables]
        blocks = [b for t in d.block_tables for b in t]
        sets: list[SamplingParams] = []
        seen: dict[int, int] = {}
        index = []
        for sp in (*d.sampling, *(s.sampling for s in plan.prefills if s.sample)):
            i = seen.get(id(sp))
            if i is None:
                i = seen[id(sp)] = len(sets)
                sets.append(sp)
            index.append(i)
        needs_len = any(sp.needs_prompt_len for sp in sets) or any(
            s.sampling.needs_prompt_len for s in plan.prefills
        )
        prompt_lens = list(d.prompt_lens or [0] * nd) if needs_len else None
        history = [r for r in range(nd) if d.sampling[r].penalized] if needs_len else None
        lens = None
        rows = None
        if plan.prefills:
            lens = [1] * nd
            rows = list(range(nd))
            for k, s in enumerate(plan.prefills):
                if not s.token_ids:
                    raise ValueError(f"prefill of {s.request_id} has no token ids")
                rids.append(s.request_id)
                positions.append(s.start_pos)
                tokens.extend(s.token_ids)
                lens.append(len(s.token_ids))
                table_lens.append(len(s.block_table))
                blocks.extend(s.block_table)
                if s.sample:
                    rows.append(nd + k)
                if prompt_lens is not None and history is not None:
                    prompt_lens.append(s.prompt_len)
                    if s.sampling.penalized:
                        history.append(nd + k)
        return cls(
            plan.step_id,
            plan.worker_id,
            rids,
            positions,
            tokens,
            table_lens,
            blocks,
            sets,
            index,
            nd,
            lens,
            rows,
            plan.block_copies,
            prompt_lens,
            history or None,
        )
