"""Discrete-event simulator: the real SchedulerCore and policies, a virtual clock, a cost model.

Events on one heap, in virtual time: request arrivals and step completions. A simulated worker
takes a BatchPlan, lasts `cost_model.iteration_time(plan.shape())`, and returns one token per
sampled sequence: EOS when the request reaches the output length its trace record says, another
id otherwise. So the core stops requests exactly as it would live, by seeing EOS; it never knows
the true length. Same seed, same trace, same config -> same numbers (only the measured
scheduler wall time differs).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core import (
    SLO,
    FinishEvent,
    Placement,
    PreemptEvent,
    Request,
    SamplingParams,
    SchedulerCore,
    StepResult,
    WorkerSpec,
    make_policy,
)
from .cost_model import CostModel
from .metrics import RequestMetrics, RunMetrics, summarize
from .rl_models import OracleRL
from .workload import TraceRecord

EOS, OTHER = 0, 1


@dataclass(frozen=True)
class SimConfig:
    policy: str
    policy_options: dict = field(default_factory=dict)
    num_workers: int = 1
    placement: str | Placement | None = None  # None: the core's default (core/placement.py)
    token_budget: int | None = None  # None: the cost model's knee
    max_num_seqs: int = 256
    num_blocks: int | None = None  # None: the profile's KV capacity
    slo_k: float = 5.0  # JCT deadline = arrival + slo_k * unloaded JCT
    # TTFT/TPOT SLO (DistServe's kind) instead of the JCT one when either is set (seconds).
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    # Per-request (ttft_s, tpot_s), request i taking entry i: SLO classes (sweep.SloSpec).
    slo_per_request: tuple[tuple[float | None, float | None], ...] | None = None
    drain_s: float = 3600.0  # stop this long after the last arrival; unfinished = SLO missed
    seed: int = 0
    check_ledger: bool = False  # run the ledger's invariant check every step (tests)


@dataclass
class _Sim:
    core: SchedulerCore
    cost: CostModel
    true_len: dict[str, int]
    idle: set[str]
    heap: list = field(default_factory=list)
    seq: itertools.count = field(default_factory=itertools.count)
    sched_us: list[float] = field(default_factory=list)  # wall time of schedule() per plan
    apply_us: list[float] = field(default_factory=list)  # wall time of apply() per result
    iter_tokens: list[int] = field(default_factory=list)
    iter_time: list[float] = field(default_factory=list)
    kv_reserved: list[float] = field(default_factory=list)
    kv_written: list[float] = field(default_factory=list)
    # Requests failed while scheduling; counted as done at the next step result (as ever).
    sched_finished: int = 0


def make_request(
    i: int, rec: TraceRecord, rl_model, rng, cost: CostModel, cfg: SimConfig, max_model_len: int
) -> Request:
    prompt = min(rec.prompt_tokens, max_model_len - 1)
    pred = rl_model.predict(rec, rng)
    per = cfg.slo_per_request
    ttft, tpot = per[i] if per is not None else (cfg.slo_ttft_s, cfg.slo_tpot_s)
    if ttft is None and tpot is None:
        unloaded = cost.unloaded_jct(prompt, rec.output_tokens)
        slo_jct = rec.slo_jct_s if rec.slo_jct_s is not None else cfg.slo_k * unloaded
    else:
        # Met iff TTFT <= ttft and TPOT <= tpot (metrics.py); together they imply
        # JCT <= ttft + tpot x (outputs - 1), which the scheduler gets as the deadline (the JCT
        # SLO uses the true length the same way, through the unloaded JCT).
        outputs = max(1, min(rec.output_tokens, max_model_len - prompt))
        slo_jct = math.inf if ttft is None else ttft
        if outputs > 1:
            slo_jct += (math.inf if tpot is None else tpot) * (outputs - 1)
    return Request(
        request_id=f"r{i}",
        prompt_len=prompt,
        arrival_s=rec.arrival_s,
        # Clients rarely know the answer's length: max_tokens is whatever the context allows.
        sampling=SamplingParams(max_tokens=max_model_len - prompt),
        slo=SLO(jct_deadline_s=rec.arrival_s + slo_jct, ttft_s=ttft, tpot_s=tpot),
        eos_token_id=EOS,
        predicted_rl=pred.point,
        predicted_rl_upper=pred.upper,
    )


def simulate(
    records: Sequence[TraceRecord], cfg: SimConfig, cost: CostModel, rl_model
) -> tuple[RunMetrics, list[RequestMetrics]]:
    run, per, _ = simulate_with_log(records, cfg, cost, rl_model)
    return run, per


def simulate_with_log(
    records: Sequence[TraceRecord], cfg: SimConfig, cost: CostModel, rl_model
) -> tuple[RunMetrics, list[RequestMetrics], _Sim]:
    """`simulate`, also returning the per-step log (scheduler wall times, step times, KV)."""
    policy = make_policy(cfg.policy, **cfg.policy_options)
    if policy.wants_oracle_rl:
        rl_model = OracleRL()
    core = SchedulerCore(policy, cfg.placement)
    profile = cost.profile
    budget = cfg.token_budget or cost.token_budget()
    num_blocks = cfg.num_blocks or profile.num_blocks()
    for w in range(cfg.num_workers):
        core.add_worker(
            WorkerSpec(
                f"w{w}",
                num_blocks,
                profile.block_size,
                budget,
                cfg.max_num_seqs,
                profile.max_model_len,
            )
        )
    sim = _Sim(core, cost, {}, set(core.workers))
    rng = np.random.default_rng(cfg.seed)
    requests: list[Request] = []
    for i, rec in enumerate(records):
        r = make_request(i, rec, rl_model, rng, cost, cfg, profile.max_model_len)
        requests.append(r)
        sim.true_len[r.request_id] = max(1, min(rec.output_tokens, r.sampling.max_tokens))
        heapq.heappush(sim.heap, (rec.arrival_s, next(sim.seq), "arrive", r))

    horizon = (records[-1].arrival_s if records else 0.0) + cfg.drain_s
    done = 0
    now = 0.0
    while sim.heap and done < len(requests):
        now, _, kind, payload = heapq.heappop(sim.heap)
        if now > horizon:
            break
        if kind == "arrive":
            done += _count_finished(core.add(payload, now))
        else:
            plan = payload
            result = _run_plan(sim, plan)
            t0 = time.perf_counter()
            events = core.update(result, now)
            sim.apply_us.append((time.perf_counter() - t0) * 1e6)
            done += _count_finished(events) + sim.sched_finished
            sim.sched_finished = 0
            if cfg.check_ledger:
                core.workers[plan.worker_id].ledger.check()
            sim.idle.add(plan.worker_id)
        _dispatch(sim, now)
    run = summarize(requests, sim, core, now, budget)
    return run, [RequestMetrics.of(r) for r in requests], sim


def _count_finished(events) -> int:
    return sum(1 for e in events if isinstance(e, FinishEvent))


def _run_plan(sim: _Sim, plan) -> StepResult:
    true_len, requests = sim.true_len, sim.core.requests
    tokens = [
        EOS if len(requests[rid].output_token_ids) + 1 >= true_len[rid] else OTHER
        for rid in plan.sampled_ids()
    ]
    return StepResult(plan.step_id, plan.worker_id, tokens)


def _dispatch(sim: _Sim, now: float) -> None:
    """Give every idle worker its next plan, if there is work for it."""
    core = sim.core
    for wid in sorted(sim.idle):
        t0 = time.perf_counter()
        plan, events = core.schedule(wid, now)
        us = (time.perf_counter() - t0) * 1e6
        sim.sched_finished += _count_finished(events)
        if plan is None:
            continue
        sim.sched_us.append(us)
        sim.idle.discard(wid)
        dt = sim.cost.iteration_time(plan.shape())
        sim.iter_tokens.append(plan.num_tokens)
        sim.iter_time.append(dt)
        u = core.workers[wid].ledger.usage()
        sim.kv_reserved.append(u.blocks_used / u.num_blocks)
        bs = core.workers[wid].spec.block_size
        sim.kv_written.append(u.tokens_written / max(1, u.blocks_used * bs))
        heapq.heappush(sim.heap, (now + dt, next(sim.seq), "step", plan))


__all__ = ["SimConfig", "simulate", "simulate_with_log", "PreemptEvent"]
