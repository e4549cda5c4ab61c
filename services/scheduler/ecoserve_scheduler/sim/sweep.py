"""Rate sweeps and the highest rate a policy sustains at a target SLO attainment.

Every policy sees the same requests (lengths and predictions drawn from the same seed) at the
same arrival times for a given rate, and the same cost model: same code, same trace.

SLO definitions (`SloSpec`): "jct", JCT <= k x the request's unloaded JCT (the default), or
"ttft-tpot", DistServe's per-request goodput (TTFT <= a target and TPOT <= a target) with one
or more classes of targets drawn per request by a seeded coin (`SloSpec.assign`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .cost_model import CostModel, load_profile
from .engine import SimConfig, simulate
from .metrics import RequestMetrics, RunMetrics, meets
from .rl_models import make_rl_model
from .workload import TraceRecord, build_workload


@dataclass(frozen=True)
class SloClass:
    """One class of a TTFT/TPOT SLO: its share of the requests and its targets (seconds)."""

    name: str
    share: float
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class SloSpec:
    """An SLO definition. kind "jct": JCT <= k x unloaded JCT; kind "ttft-tpot": a request of
    class c meets it when TTFT <= c.ttft_s and TPOT <= c.tpot_s."""

    name: str = "jct"
    kind: str = "jct"
    k: float = 5.0
    classes: tuple[SloClass, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("jct", "ttft-tpot"):
            raise ValueError(f"SLO kind must be 'jct' or 'ttft-tpot', got {self.kind!r}")
        if self.kind == "ttft-tpot":
            total = sum(c.share for c in self.classes)
            shares = [c.share for c in self.classes]
            if not shares or abs(total - 1.0) > 1e-9 or min(shares) < 0:
                raise ValueError(f"ttft-tpot SLO needs classes with shares summing to 1: {self}")

    def assign(self, n: int, seed: int) -> list[int]:
        """The class index of each of n requests: one seeded uniform draw per request, the same
        for every rate and policy (request i keeps its class across a sweep)."""
        if self.kind != "ttft-tpot" or len(self.classes) == 1:
            return [0] * n
        edges = np.cumsum([c.share for c in self.classes])
        u = np.random.default_rng([seed, 3]).random(n)
        idx = np.searchsorted(edges, u, side="right")
        return np.minimum(idx, len(self.classes) - 1).tolist()

    def sim_fields(self, n: int, seed: int) -> dict:
        """SimConfig fields that make the simulated requests carry this SLO."""
        if self.kind == "jct":
            return {"slo_k": self.k}
        if len(self.classes) == 1:
            c = self.classes[0]
            return {"slo_ttft_s": c.ttft_s, "slo_tpot_s": c.tpot_s}
        per = tuple((self.classes[i].ttft_s, self.classes[i].tpot_s) for i in self.assign(n, seed))
        return {"slo_per_request": per}


def ttft_tpot_targets(
    cost: CostModel, prompt_tokens: int, output_tokens: int, ttft_x: float, tpot_x: float
) -> tuple[float, float]:
    """DistServe-style targets for a profile: `ttft_x` x the unloaded TTFT (chunked prefill
    alone) of a typical prompt and `tpot_x` x the unloaded TPOT (decode at batch 1) of a
    typical request. Returns (ttft_s, tpot_s)."""
    ttft = cost.prefill_time(prompt_tokens)
    decode = cost.unloaded_jct(prompt_tokens, output_tokens) - ttft
    if output_tokens > 1:
        tpot = decode / (output_tokens - 1)
    else:
        tpot = cost.decode_step_time(1, prompt_tokens)
    return ttft_x * ttft, tpot_x * tpot


def evaluate(
    spec: SloSpec, per: Sequence[RequestMetrics], cost: CostModel, seed: int, duration_s: float
) -> dict:
    """Score one run's requests under `spec`: attainment, goodput, and per class (ttft-tpot)
    the requests and attainment. Equal to the engine's own verdict when the run carried `spec`
    (metrics.meets judges as RequestMetrics.of does)."""
    if spec.kind == "jct":
        met = [
            meets(m, jct_s=spec.k * cost.unloaded_jct(m.prompt_tokens, m.output_tokens))
            for m in per
        ]
        out = {"slo_attainment": _share(met), "goodput_rps": sum(met) / duration_s}
        return out
    cls = spec.assign(len(per), seed)
    met = [
        meets(m, ttft_s=spec.classes[c].ttft_s, tpot_s=spec.classes[c].tpot_s)
        for m, c in zip(per, cls, strict=True)
    ]
    out = {"slo_attainment": _share(met), "goodput_rps": sum(met) / duration_s}
    if len(spec.classes) > 1:
        out["classes"] = {
            c.name: {
                "requests": sum(1 for k in cls if k == i),
                "slo_attainment": _share([x for x, k in zip(met, cls, strict=True) if k == i]),
            }
            for i, c in enumerate(spec.classes)
        }
    return out


def _share(met: Sequence[bool]) -> float:
    return sum(met) / len(met) if met else 0.0


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
    slo: SloSpec | None = None  # None: JCT <= slo_k x unloaded JCT

    def cost_model(self) -> CostModel:
        return CostModel(load_profile(self.profile))

    def slo_spec(self) -> SloSpec:
        return self.slo if self.slo is not None else SloSpec("jct", "jct", self.slo_k)


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
    slo = sc.slo.sim_fields(len(records), sc.seed) if sc.slo is not None else {"slo_k": sc.slo_k}
    cfg = SimConfig(
        policy=policy,
        policy_options=options or {},
        num_workers=sc.num_workers,
        num_blocks=sc.num_blocks,
        token_budget=sc.token_budget,
        seed=sc.seed,
        **slo,
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
    """Highest rate with attainment >= target (`search_max_rate` from `lo`: doubling, then
    bisection). Returns the rate (0 if even `lo` misses) and every run made."""
    seen: dict[float, RunMetrics] = {}

    def attainment(rate: float) -> float:
        seen[rate] = run(sc, policy, rate, options)
        return seen[rate].slo_attainment

    rate, _ = search_max_rate(attainment, target, lo, hi, rel_tol, floor_div=1.0)
    return rate, seen


def round_rate(rate: float) -> float:
    """Rates to 4 significant digits, so searches that meet at a rate share its run."""
    return float(f"{rate:.4g}")


def search_max_rate(
    attainment: Callable[[float], float],
    target: float = 0.9,
    lo: float = 1.0,
    hi: float = 64.0,
    rel_tol: float = 0.05,
    guess: float | None = None,
    step: float = 1.25,
    floor_div: float = 16.0,
) -> tuple[float, dict[float, float]]:
    """Highest rate with attainment(rate) >= target; returns it (0 if none down to
    lo / floor_div passes) and {rate: attainment} of every rate asked.

    Without `guess`: from `lo`, doubling up to a miss (or `hi`), or halving down to a pass.
    With `guess` (e.g. another policy's answer): from there, by a factor `step` that grows (to
    at most 2) after each move in the same direction, so a near guess costs ~2 runs to bracket.
    Then bisection until (miss - pass) / pass <= rel_tol. Rates are rounded (`round_rate`), so a
    caller that caches attainment by rate gets hits across searches."""
    tried: dict[float, float] = {}

    def ok(rate: float) -> bool:
        rate = round_rate(rate)
        if rate not in tried:
            tried[rate] = attainment(rate)
        return tried[rate] >= target

    start, factor = (round_rate(guess), step) if guess else (round_rate(lo), 2.0)
    grow = _grow if guess else (lambda f: f)
    if ok(start):
        good, bad = start, math.inf
        while bad == math.inf:
            nxt = round_rate(good * factor)
            if nxt > hi:
                return good, tried
            if ok(nxt):
                good, factor = nxt, grow(factor)
            else:
                bad = nxt
    else:
        good, bad = 0.0, start
        while good == 0.0:
            nxt = round_rate(bad / factor)
            if nxt < lo / floor_div:
                return 0.0, tried
            if ok(nxt):
                good = nxt
            else:
                bad, factor = nxt, grow(factor)
    while (bad - good) / good > rel_tol:
        mid = round_rate((good + bad) / 2)
        if mid in (good, bad):
            break
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good, tried


def _grow(factor: float) -> float:
    return min(factor * factor, 2.0)
