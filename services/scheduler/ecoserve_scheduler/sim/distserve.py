"""DistServe-style disaggregated serving (Zhong et al., OSDI'24) in the simulator.

`prefill` GPUs only run prompts, `decode` GPUs only run generation; each request's KV cache is
shipped from its prefill GPU to a decode GPU over a named link (sim/links.py). One GPU is one
instance (the 7B/A100 profile fits on one GPU; no intra-op parallelism is modelled).

* Prefill instance: FCFS queue (a new request goes to the instance with the fewest prompt
  tokens queued or running). A batch takes whole prompts (DistServe does not chunk) while
  their tokens fit `prefill_budget` (default: the cost model's knee, where prefill throughput
  saturates; a longer prompt runs alone) and their KV fits the instance's free blocks. The
  batch samples each request's first token (its TTFT). The KV stays on the prefill GPU until
  it is shipped.
* Migration: requests wait FCFS for a decode instance whose free KV, after a `watermark`, holds
  the prompt's blocks; the one with the most free blocks is chosen (pull-based as in DistServe:
  decode capacity limits admission, and prefill backs up behind it). Transfers into one decode
  GPU are serialised on its link: `link.transfer_s(prompt tokens x KV bytes per token)`.
* Decode instance: continuous batching of every admitted request (up to `max_num_seqs`), blocks
  allocated on demand as tokens are written (vLLM paging); when a block cannot be had the most
  recently admitted request is preempted and recomputed on a prefill instance.

Iteration times come from the same CostModel as the colocated systems: a prefill batch is a
BatchShape with prefill chunks only, a decode step one with decode sequences only.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ecoserve_common.plan import BatchShape

from ..core import Request, Status
from ..core.ledger import blocks_for
from ..core.state import Counters
from .cost_model import CostModel
from .engine import SimConfig, make_request
from .links import get_link
from .metrics import RequestMetrics, RunMetrics, summarize
from .workload import TraceRecord


@dataclass(frozen=True)
class DistConfig:
    prefill: int = 1  # prefill GPUs
    decode: int = 1  # decode GPUs
    link: str = "nvlink-a100"
    prefill_budget: int | None = None  # tokens per prefill batch; None: the cost model's knee
    max_num_seqs: int = 256  # per decode instance
    num_blocks: int | None = None  # per GPU; None: the profile's KV capacity
    watermark: float = 0.01  # decode admissions leave this share of blocks free (as vLLM)

    @property
    def split(self) -> str:
        return f"{self.prefill}:{self.decode}"


@dataclass(eq=False)
class _Job:
    r: Request
    true_len: int
    blocks: int = 0  # blocks held on the instance it is on (or being shipped from)


@dataclass(eq=False)
class _Prefill:
    free: int
    queue: deque = field(default_factory=deque)
    queued_tokens: int = 0  # waiting, plus the batch running now
    busy: bool = False


@dataclass(eq=False)
class _Decode:
    free: int
    running: list = field(default_factory=list)  # admission order
    incoming: int = 0  # requests being shipped here
    link_free_s: float = 0.0
    busy: bool = False


class DistServeSim:
    def __init__(
        self, records: Sequence[TraceRecord], cfg: SimConfig, dist: DistConfig, cost, rl_model
    ) -> None:
        if dist.prefill < 1 or dist.decode < 1:
            raise ValueError("DistServe needs at least one prefill and one decode GPU")
        self.cfg, self.dist, self.cost = cfg, dist, cost
        profile = cost.profile
        self.block_size = profile.block_size
        self.num_blocks = dist.num_blocks or cfg.num_blocks or profile.num_blocks()
        self.watermark_blocks = int(dist.watermark * self.num_blocks)
        self.budget = dist.prefill_budget or cfg.token_budget or cost.token_budget()
        self.link = get_link(dist.link)
        self.kv_bytes = profile.kv_bytes_per_token
        self.prefills = [_Prefill(self.num_blocks) for _ in range(dist.prefill)]
        self.decodes = [_Decode(self.num_blocks) for _ in range(dist.decode)]
        self.migrating: deque[tuple[_Job, int]] = deque()  # (job, prefill instance)
        self.heap: list = []
        self.seq = itertools.count()
        self.counters = Counters()
        self.stats = SimpleNamespace(
            sched_us=[], apply_us=[], iter_tokens=[], iter_time=[], kv_reserved=[], kv_written=[]
        )
        self.transfer_s: list[float] = []  # every KV transfer's duration
        self.peak_decode_running = 0  # most requests one decode instance held at once
        self.busy_s = {"prefill": 0.0, "decode": 0.0}  # GPU-seconds spent computing, per kind
        rng = np.random.default_rng(cfg.seed)
        self.requests: list[Request] = []
        for i, rec in enumerate(records):
            r = make_request(i, rec, rl_model, rng, cost, cfg, profile.max_model_len)
            self.requests.append(r)
            job = _Job(r, max(1, min(rec.output_tokens, r.sampling.max_tokens)))
            self._push(rec.arrival_s, "arrive", (job,))
        self.horizon = (records[-1].arrival_s if records else 0.0) + cfg.drain_s
        self.done = 0

    def _push(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, payload))

    # ---- event loop -----------------------------------------------------------------------

    def run(self) -> tuple[RunMetrics, list[RequestMetrics]]:
        now = 0.0
        while self.heap and self.done < len(self.requests):
            now, _, kind, payload = heapq.heappop(self.heap)
            if now > self.horizon:
                break
            getattr(self, f"_on_{kind}")(now, *payload)
        core_like = SimpleNamespace(counters=self.counters)
        run = summarize(self.requests, self.stats, core_like, now, self.budget)
        return run, [RequestMetrics.of(r) for r in self.requests]

    def _on_arrive(self, now: float, job: _Job) -> None:
        r = job.r
        if blocks_for(r.prompt_len + 1, self.block_size) > self.num_blocks - self.watermark_blocks:
            self._end(job, now, Status.FAILED, "failed: prompt larger than a GPU's KV cache")
            return
        r.status = Status.RUNNING
        self._enqueue_prefill(job, now)

    def _enqueue_prefill(self, job: _Job, now: float) -> None:
        i = min(range(len(self.prefills)), key=lambda k: self.prefills[k].queued_tokens)
        p = self.prefills[i]
        p.queue.append(job)
        p.queued_tokens += job.r.num_tokens
        self._start_prefill(i, now)

    def _start_prefill(self, i: int, now: float) -> None:
        p = self.prefills[i]
        if p.busy or not p.queue:
            return
        batch, tokens = [], 0
        while p.queue:
            job = p.queue[0]
            n = job.r.num_tokens  # prompt, plus outputs when recomputing after a preemption
            need = blocks_for(n + 1, self.block_size)
            if batch and tokens + n > self.budget or need > p.free:
                break
            p.queue.popleft()
            p.free -= need
            job.blocks = need
            batch.append(job)
            tokens += n
        if not batch:
            return  # the head waits for KV to be shipped away
        p.busy = True
        shape = BatchShape(prefill_chunks=tuple((j.r.num_tokens, 0) for j in batch))
        dt = self.cost.iteration_time(shape)
        self.busy_s["prefill"] += dt
        self.stats.iter_tokens.append(tokens)
        self.stats.iter_time.append(dt)
        self.stats.kv_reserved.append(1.0 - p.free / self.num_blocks)
        self._push(now + dt, "prefill_done", (i, batch))

    def _on_prefill_done(self, now: float, i: int, batch: list[_Job]) -> None:
        p = self.prefills[i]
        p.busy = False
        for job in batch:
            r = job.r
            p.queued_tokens -= r.num_tokens
            r.num_computed = r.num_tokens
            r.output_token_ids.append(1)
            if r.first_token_s is None:
                r.first_token_s = now
            if r.num_output >= job.true_len:
                p.free += job.blocks
                self._end(job, now, Status.FINISHED, "stop")
            else:
                self.migrating.append((job, i))
        self._migrate(now)
        self._start_prefill(i, now)

    # ---- migration ------------------------------------------------------------------------

    def _migrate(self, now: float) -> None:
        """Ship waiting KV caches, FCFS, to the decode instance with the most free blocks."""
        while self.migrating:
            job, src = self.migrating[0]
            need = blocks_for(job.r.num_tokens, self.block_size)
            d = max(range(len(self.decodes)), key=lambda k: self.decodes[k].free)
            dec = self.decodes[d]
            seqs = len(dec.running) + dec.incoming
            if need + self.watermark_blocks > dec.free or seqs >= self.dist.max_num_seqs:
                return  # decode KV is full: admission waits (prefill KV backs up behind it)
            self.migrating.popleft()
            dec.free -= need
            dec.incoming += 1
            start = max(now, dec.link_free_s)
            dt = self.link.transfer_s(job.r.num_computed * self.kv_bytes)
            dec.link_free_s = start + dt
            self.transfer_s.append(dt)
            self._push(start + dt, "shipped", (job, src, d, need))

    def _on_shipped(self, now: float, job: _Job, src: int, d: int, need: int) -> None:
        self.prefills[src].free += job.blocks
        job.blocks = need
        dec = self.decodes[d]
        dec.incoming -= 1
        dec.running.append(job)
        self.peak_decode_running = max(self.peak_decode_running, len(dec.running))
        self._start_prefill(src, now)
        self._start_decode(d, now)

    # ---- decode ---------------------------------------------------------------------------

    def _start_decode(self, d: int, now: float) -> None:
        dec = self.decodes[d]
        if dec.busy or not dec.running:
            return
        i = 0
        while i < len(dec.running):  # each request needs room for the token it feeds now
            job = dec.running[i]
            need = blocks_for(job.r.num_tokens, self.block_size) - job.blocks
            if need > 0 and not self._make_room(dec, job, need, now):
                continue  # job itself left (it was the most recent): the list ends at i
            i += 1
        batch = dec.running[: self.dist.max_num_seqs]
        if not batch:
            self._migrate(now)
            return
        ctx = sum(j.r.num_tokens for j in batch)
        dt = self.cost.iteration_time(BatchShape(decode_seqs=len(batch), decode_context_tokens=ctx))
        dec.busy = True
        self.busy_s["decode"] += dt
        self.stats.iter_tokens.append(len(batch))
        self.stats.iter_time.append(dt)
        self.stats.kv_reserved.append(1.0 - dec.free / self.num_blocks)
        self._push(now + dt, "decode_done", (d, batch))

    def _make_room(self, dec: _Decode, job: _Job, need: int, now: float) -> bool:
        """Give job `need` more blocks, preempting the most recently admitted requests (vLLM's
        rule) until they fit; False if job itself had to go."""
        while need > dec.free:
            victim = dec.running.pop()
            dec.free += victim.blocks
            victim.blocks = 0
            if victim is job:
                if blocks_for(job.r.num_tokens, self.block_size) > self.num_blocks:
                    self._end(job, now, Status.FAILED, "failed: sequence outgrew the KV cache")
                else:
                    self._preempt(job, now)
                return False
            self._preempt(victim, now)
        dec.free -= need
        job.blocks += need
        return True

    def _on_decode_done(self, now: float, d: int, batch: list[_Job]) -> None:
        dec = self.decodes[d]
        dec.busy = False
        finished = False
        for job in batch:
            r = job.r
            r.num_computed += 1
            r.output_token_ids.append(1)
            if r.num_output >= job.true_len:
                dec.free += job.blocks
                job.blocks = 0
                self._end(job, now, Status.FINISHED, "stop")
                finished = True
        if finished:
            dec.running = [j for j in dec.running if j.r.status is Status.RUNNING]
        self._migrate(now)
        self._start_decode(d, now)

    def _preempt(self, job: _Job, now: float) -> None:
        """Recompute: the request's KV is dropped; it is prefilled again (prompt + outputs)."""
        job.blocks = 0
        job.r.num_computed = 0
        job.r.preemptions += 1
        self.counters.preemptions += 1
        self._enqueue_prefill(job, now)

    def _end(self, job: _Job, now: float, status: Status, reason: str) -> None:
        r = job.r
        r.status, r.finished_s, r.finish_reason = status, now, reason
        if status is Status.FINISHED:
            self.counters.finished += 1
        else:
            self.counters.failed += 1
        self.done += 1


def simulate_distserve(
    records: Sequence[TraceRecord], cfg: SimConfig, dist: DistConfig, cost: CostModel, rl_model
) -> tuple[RunMetrics, list[RequestMetrics]]:
    """Run `records` on a DistServe cluster of dist.prefill + dist.decode GPUs."""
    return DistServeSim(records, cfg, dist, cost, rl_model).run()


__all__ = ["DistConfig", "DistServeSim", "simulate_distserve"]
