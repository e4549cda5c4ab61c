"""Data-parallel replicas: N independent schedulers (one GPU each) behind a request router.

This is how vLLM is usually scaled out: every replica is a full engine with its own queue and
KV cache (here a SchedulerCore with one worker and, by default, the `vllm` policy), and a router
in front sends each arriving request to one replica, which it never leaves. Compare with
`simulate(..., num_workers=N)`, where one scheduler sees every worker and places each prompt
task when it is admitted (core/placement.py).

Routers:
* `round-robin`: request i goes to replica i mod N.
* `least-loaded`: the replica with the fewest outstanding requests (waiting + running), ties to
  the lowest index; what a load balancer that counts open requests does.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np

from ..core import SchedulerCore, WorkerSpec, make_policy
from ..core.state import Counters
from .cost_model import CostModel
from .engine import SimConfig, _count_finished, _dispatch, _run_plan, _Sim, make_request
from .metrics import RequestMetrics, RunMetrics, summarize
from .rl_models import OracleRL
from .workload import TraceRecord

ROUTERS = ("round-robin", "least-loaded")


def outstanding(core: SchedulerCore) -> int:
    """Requests a replica holds: waiting plus running."""
    return core.num_waiting + sum(len(w.running) for w in core.workers.values())


def route(router: str, cores: list[SchedulerCore], i: int) -> int:
    """Index of the replica that gets the i-th arriving request."""
    if router == "round-robin":
        return i % len(cores)
    return min(range(len(cores)), key=lambda k: outstanding(cores[k]))


def simulate_replicas(
    records: Sequence[TraceRecord],
    cfg: SimConfig,
    cost: CostModel,
    rl_model,
    replicas: int,
    router: str = "least-loaded",
) -> tuple[RunMetrics, list[RequestMetrics]]:
    """Run `records` on `replicas` independent single-GPU engines with policy `cfg.policy`."""
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; known: {', '.join(ROUTERS)}")
    if replicas < 1:
        raise ValueError("need at least one replica")
    profile = cost.profile
    budget = cfg.token_budget or cost.token_budget()
    num_blocks = cfg.num_blocks or profile.num_blocks()
    heap: list = []
    seq = itertools.count()
    true_len: dict[str, int] = {}  # shared: request ids are unique across replicas
    sims: dict[str, _Sim] = {}
    for i in range(replicas):
        policy = make_policy(cfg.policy, **cfg.policy_options)
        core = SchedulerCore(policy, cfg.placement)
        wid = f"w{i}"
        spec = WorkerSpec(
            wid, num_blocks, profile.block_size, budget, cfg.max_num_seqs, profile.max_model_len
        )
        core.add_worker(spec)
        sims[wid] = _Sim(core, cost, true_len, {wid}, heap=heap, seq=seq)
    order = list(sims.values())
    if any(s.core.policy.wants_oracle_rl for s in order):
        rl_model = OracleRL()
    rng = np.random.default_rng(cfg.seed)
    requests = []
    for i, rec in enumerate(records):
        r = make_request(i, rec, rl_model, rng, cost, cfg, profile.max_model_len)
        requests.append(r)
        true_len[r.request_id] = max(1, min(rec.output_tokens, r.sampling.max_tokens))
        heapq.heappush(heap, (rec.arrival_s, next(seq), "arrive", r))
    routed = 0
    horizon = (records[-1].arrival_s if records else 0.0) + cfg.drain_s
    done, now = 0, 0.0
    while heap and done < len(requests):
        now, _, kind, payload = heapq.heappop(heap)
        if now > horizon:
            break
        if kind == "arrive":
            sim = order[route(router, [s.core for s in order], routed)]
            routed += 1
            done += _count_finished(sim.core.add(payload, now))
        else:
            sim = sims[payload.worker_id]
            result = _run_plan(sim, payload)
            t0 = time.perf_counter()
            events = sim.core.update(result, now)
            sim.apply_us.append((time.perf_counter() - t0) * 1e6)
            done += _count_finished(events) + sim.sched_finished
            sim.sched_finished = 0
            sim.idle.add(payload.worker_id)
        _dispatch(sim, now)
    return _summarize(requests, order, now, budget), [RequestMetrics.of(r) for r in requests]


def _summarize(requests, sims: list[_Sim], now: float, budget: int) -> RunMetrics:
    """One RunMetrics over all replicas: their step logs concatenated, counters summed."""
    fields = ("sched_us", "apply_us", "iter_tokens", "iter_time", "kv_reserved", "kv_written")
    merged = SimpleNamespace(**{f: [x for s in sims for x in getattr(s, f)] for f in fields})
    total = Counters()
    for s in sims:
        for k in total.__dataclass_fields__:
            setattr(total, k, getattr(total, k) + getattr(s.core.counters, k))
    return summarize(requests, merged, SimpleNamespace(counters=total), now, budget)


__all__ = ["ROUTERS", "outstanding", "route", "simulate_replicas"]
