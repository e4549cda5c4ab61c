"""Rate sweeps and the highest rate a policy sustains at a target SLO attainment.

Every policy sees the same requests (lengths and predictions drawn from the same seed) at the
same arrival times for a given rate, and the same cost model: same code, same trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cost_model import CostModel, load_profile
from .engine import SimConfig, simulate
from .metrics import RequestMetrics, RunMetrics
from .rl_models import make_rl_model
from .workload import TraceRecord, build_workload


@dataclass(frozen=True)
class Scenario:
    trace: str = "sharegpt"  # sharegpt | azure_conv | alpaca | synthetic
    n: int = 1000
    seed: int = 0
    profile: str = "llama-2-7b_a100-80gb"
    rl_model: str = "noisy"  # oracle | noisy | alpaca
    slo_k: float = 5.0
    arrival: str = "poisson"
    data_dir: str | None = None
    fallback: bool = True  # synthetic lengths when the data is absent
    num_workers: int = 1
    num_blocks: int | None = None
    token_budget: int | None = None
    extra: dict = field(default_factory=dict)  # more SimConfig fields

    def cost_model(self) -> CostModel:
        return CostModel(load_profile(self.profile))


_WORKLOADS: dict[tuple, tuple[list[TraceRecord], str]] = {}


def workload(sc: Scenario, rate: float) -> tuple[list[TraceRecord], str]:
    key = (sc.trace, rate, sc.n, sc.seed, sc.data_dir, sc.arrival, sc.fallback)
    if key not in _WORKLOADS:
        _WORKLOADS[key] = build_workload(
            sc.trace,
            rate,
            sc.n,
            sc.seed,
            data_dir=sc.data_dir,
            arrival=sc.arrival,
            fallback=sc.fallback,
        )
    return _WORKLOADS[key]


def simulate_at(
    sc: Scenario, policy: str, rate: float, options: dict | None = None
) -> tuple[RunMetrics, list[RequestMetrics]]:
    """One simulation of the scenario's workload at `rate`: run and per-request metrics."""
    records, _ = workload(sc, rate)
    cfg = SimConfig(
        policy=policy,
        policy_options=options or {},
        num_workers=sc.num_workers,
        num_blocks=sc.num_blocks,
        token_budget=sc.token_budget,
        slo_k=sc.slo_k,
        seed=sc.seed,
        **sc.extra,
    )
    return simulate(records, cfg, sc.cost_model(), make_rl_model(sc.rl_model, sc.data_dir))


def run(sc: Scenario, policy: str, rate: float, options: dict | None = None) -> RunMetrics:
    return simulate_at(sc, policy, rate, options)[0]


def max_rate_at_slo(
    sc: Scenario,
    policy: str,
    options: dict | None = None,
    target: float = 0.9,
    lo: float = 0.25,
    hi: float = 64.0,
    rel_tol: float = 0.05,
) -> tuple[float, dict[float, RunMetrics]]:
    """Highest rate with attainment >= target, by doubling then bisection (attainment falls with
    rate, up to noise). Returns the rate (0 if even `lo` misses) and every run made."""
    seen: dict[float, RunMetrics] = {}

    def ok(rate: float) -> bool:
        seen[rate] = run(sc, policy, rate, options)
        return seen[rate].slo_attainment >= target

    if not ok(lo):
        return 0.0, seen
    good, bad = lo, None
    while bad is None:
        nxt = good * 2
        if nxt > hi:
            return good, seen
        if ok(nxt):
            good = nxt
        else:
            bad = nxt
    while (bad - good) / good > rel_tol:
        mid = (good + bad) / 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good, seen
