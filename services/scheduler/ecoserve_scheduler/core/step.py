"""Step: the iteration being built for one worker (token budget, chosen chunks, block moves).

A plain builder with no reference to the core: `SchedulerCore.schedule` fills it, policy hooks
read it (the worker's ledger and running requests, the time, the measured iteration time)."""

from __future__ import annotations

from collections.abc import Mapping

from ecoserve_common.plan import DecodeBatch, ScheduledSeq

from .events import Event
from .request import Request, Status
from .state import WorkerState


class Step:
    def __init__(
        self, w: WorkerState, now: float, iter_s: float, workers: Mapping[str, WorkerState]
    ) -> None:
        self.w = w
        self.spec = w.spec
        self.ledger = w.ledger
        self.now = now
        self.iter_s = iter_s  # measured iteration time (EMA over all workers; 0.0: none yet)
        self.workers = workers  # every worker, this one included (read by placement)
        self.budget = w.spec.token_budget
        self.prefills: list[ScheduledSeq] = []
        self.decode_ids: list[str] = []
        self.decode_reqs: list[Request] = []
        self.copies: list[tuple[int, int]] = []
        self.events: list[Event] = []  # preemptions and failures raised while building it
        # Context tokens of this step's decodes, plus the prompts of the requests that went on
        # to admission after passing the policy's `admits` hook (the SLO guard reads it).
        self.context_tokens = 0
        self.preempted = 0  # requests preempted (or failed) while building this step
        self.placement_cache: list[tuple[float, int]] | None = None  # the placement's cache
        self._scheduled: set[str] = set()  # prefill chunks only; decodes are in decode_ids
        self._dropped = False  # a scheduled request was preempted: filter the columns

    @property
    def running(self) -> dict[str, Request]:
        return self.w.running

    @property
    def num_seqs(self) -> int:
        return len(self.decode_ids) + len(self.prefills)

    @property
    def full(self) -> bool:
        return self.budget <= 0 or self.num_seqs >= self.spec.max_num_seqs

    def chunk(self, r: Request, chunked: bool = True) -> int:
        """Tokens of r this step can take: all pending ones, or a budget-sized chunk. Without
        chunking (Orca) the token budget does not apply: a prompt always runs whole."""
        n = r.pending
        if n <= self.budget or not chunked:
            return n
        return self.budget

    def run_decodes(self, decodes: list[Request]) -> list[Request]:
        """Schedule one token for each decoding request that has room (the hot path: a few
        attribute reads per request). Returns those that need more blocks first."""
        decodes = decodes[: max(0, self.budget)]
        limit = self.ledger.limit
        ok = [r for r in decodes if r.num_computed < limit[r.request_id]]
        blocked = []
        if len(ok) < len(decodes):
            blocked = [r for r in decodes if r.num_computed >= limit[r.request_id]]
        ids = [r.request_id for r in ok]
        self.ledger.advance_decodes(ids)
        self.decode_ids.extend(ids)
        self.decode_reqs.extend(ok)
        self.budget -= len(ids)
        return blocked

    def run(self, r: Request, n: int) -> None:
        """Schedule n tokens of r (a prefill chunk, or a decode that needed more blocks)."""
        if r.request_id in self.w.decoding:
            self.ledger.advance(r.request_id, r.num_computed + 1)
            self.decode_ids.append(r.request_id)
            self.decode_reqs.append(r)
            self.budget -= 1
            return
        start = r.num_computed
        end = start + n
        rid = r.request_id
        self.ledger.advance(rid, end)
        self._scheduled.add(rid)
        ids = r.token_ids(start, end) if r.prompt_token_ids is not None else None
        table = tuple(self.ledger.table(rid))
        sample = end == r.prompt_len + len(r.output_token_ids)
        seq = ScheduledSeq(rid, start, n, table, sample, r.sampling, ids, r.prompt_len)
        self.prefills.append(seq)
        self.budget -= n

    def unschedule(self, r: Request) -> None:
        """r is being preempted or failed: take it out of this step if it was scheduled."""
        self.preempted += 1
        rid = r.request_id
        if rid in self._scheduled:
            self._scheduled.discard(rid)
            i = next(i for i, s in enumerate(self.prefills) if s.request_id == rid)
            self.budget += self.prefills.pop(i).num_tokens
        elif rid in self.w.decoding:
            self._dropped = True  # decode_batch filters it out if it was scheduled

    def decode_batch(self) -> DecodeBatch:
        if self._dropped:
            keep = [r for r in self.decode_reqs if r.status is Status.RUNNING]
            self.decode_reqs, self.decode_ids = keep, [r.request_id for r in keep]
        reqs = self.decode_reqs
        tables = self.ledger.table
        with_ids = bool(reqs) and reqs[0].prompt_token_ids is not None
        return DecodeBatch(
            tuple(self.decode_ids),
            tuple([r.num_computed for r in reqs]),
            tuple([tables(r.request_id) for r in reqs]),
            tuple([r.sampling for r in reqs]),
            tuple([r.output_token_ids[-1] for r in reqs]) if with_ids else None,
            tuple([r.prompt_len for r in reqs]) if with_ids else None,  # a worker's, not the sim's
        )


__all__ = ["Step"]
