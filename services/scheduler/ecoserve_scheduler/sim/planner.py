"""Capacity planner: the fewest GPUs each system needs to serve a trace at a target rate.

For a trace, an SLO and a request rate, a system "serves" the rate on g GPUs if at least
`target` (default 90%) of the requests meet their SLO in the simulator. Systems:

* `ecoserve`: one scheduler over g workers (EcoServe policy, `least-loaded` placement);
* `vllm`: g independent vLLM replicas behind a least-loaded router (data parallel);
* `distserve`: p prefill + d decode GPUs, p + d = g, KV shipped over `link`; every split is
  searched and the first passing one reported.

One instance is one GPU: the shipped 7B profiles fit a GPU (Llama-2-7B on an A100-80GB), so
"GPUs" below counts instances; a profile that needs tensor parallelism would multiply it.

SLO (`Plan.slo`):
* `jct` (default, the project's): JCT <= slo_k x the request's unloaded JCT on the profile.
* `ttft-tpot` (DistServe's kind): TTFT <= ttft_s and TPOT <= tpot_s, both per request.

Search: g grows from a lower bound (1, or the answer for a lower rate minus one) until the
system passes; the answer n is reported with the attainment at n - 1 (which failed), so every
answer is a measured minimum. Attainment is assumed to rise with GPUs; it is noisy within a
point or two, so a result is one seed's, on `n` requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .cost_model import CostModel, load_profile
from .distserve import DistConfig, simulate_distserve
from .engine import SimConfig, simulate
from .metrics import RunMetrics
from .replicas import simulate_replicas
from .rl_models import make_rl_model
from .workload import TraceRecord, build_workload, load_trace_file, mean_rate

SYSTEMS = ("ecoserve", "distserve", "vllm")


@dataclass(frozen=True)
class Plan:
    trace: str = "sharegpt"  # sharegpt | azure_conv | synthetic | a CSV/JSONL trace file
    n: int = 1000  # requests per run (at least)
    duration_s: float | None = None  # if set, n grows to rate x duration_s (steady state)
    seed: int = 0
    profile: str = "llama-2-7b_a100-80gb"
    rl_model: str = "noisy"
    data_dir: str | None = None
    slo: str = "jct"  # jct | ttft-tpot
    slo_k: float = 5.0
    ttft_s: float = 1.0
    tpot_s: float = 0.1
    target: float = 0.9
    max_gpus: int = 32
    link: str = "nvlink-a100"
    router: str = "least-loaded"
    placement: str | None = None  # None: the core's default
    sim: dict = field(default_factory=dict)  # more SimConfig fields (tests: num_blocks, ...)

    def requests_at(self, rate: float) -> int:
        """Requests per run at `rate`: a fixed count would make high rates a short burst that
        drains after the last arrival (flattering every system), so with `duration_s` the
        count grows with the rate to keep the arrival window fixed."""
        if self.duration_s is None:
            return self.n
        return max(self.n, math.ceil(rate * self.duration_s))

    def slo_text(self) -> str:
        if self.slo == "jct":
            return f"JCT <= {self.slo_k:g} x unloaded JCT"
        return f"TTFT <= {self.ttft_s:g} s and TPOT <= {self.tpot_s:g} s"

    def sim_config(self, policy: str) -> SimConfig:
        slo = {} if self.slo == "jct" else {"slo_ttft_s": self.ttft_s, "slo_tpot_s": self.tpot_s}
        if self.slo not in ("jct", "ttft-tpot"):
            raise ValueError(f"unknown SLO kind {self.slo!r}: jct | ttft-tpot")
        return SimConfig(
            policy=policy,
            slo_k=self.slo_k,
            seed=self.seed,
            placement=self.placement,
            **slo,
            **self.sim,
        )


_RECORDS: dict[tuple, tuple[list[TraceRecord], str]] = {}


def records_at(plan: Plan, rate: float) -> tuple[list[TraceRecord], str]:
    """The plan's trace at `rate` req/s (a trace file keeps its gaps, rescaled to the rate)."""
    n = plan.requests_at(rate)
    key = (plan.trace, n, plan.seed, plan.data_dir, rate)
    if key not in _RECORDS:
        if Path(plan.trace).is_file():
            recs = load_trace_file(plan.trace)[:n]
            scale = rate / mean_rate(recs)
            recs = [replace(r, arrival_s=r.arrival_s / scale) for r in recs]
            _RECORDS[key] = recs, f"{plan.trace} ({len(recs)} rows) scaled to {rate:g} req/s"
        else:
            _RECORDS[key] = build_workload(
                plan.trace, rate, n, plan.seed, data_dir=plan.data_dir, fallback=True
            )
    return _RECORDS[key]


def run_system(
    plan: Plan, system: str, rate: float, gpus: int, split: tuple[int, int] | None = None
) -> RunMetrics:
    """One simulation of `system` on `gpus` GPUs (distserve: `split` = (prefill, decode))."""
    records, _ = records_at(plan, rate)
    cost = CostModel(load_profile(plan.profile))
    rl = make_rl_model(plan.rl_model, plan.data_dir)
    if system == "ecoserve":
        cfg = replace(plan.sim_config("ecoserve"), num_workers=gpus)
        return simulate(records, cfg, cost, rl)[0]
    if system == "vllm":
        return simulate_replicas(records, plan.sim_config("vllm"), cost, rl, gpus, plan.router)[0]
    if system == "distserve":
        p, d = split or (max(1, gpus // 2), gpus - max(1, gpus // 2))
        dist = DistConfig(prefill=p, decode=d, link=plan.link)
        return simulate_distserve(records, plan.sim_config("vllm"), dist, cost, rl)[0]
    raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")


@dataclass
class Answer:
    system: str
    rate: float
    gpus: int | None  # None: not even max_gpus passes
    split: str | None = None  # distserve "p:d"
    attainment: float = 0.0  # at `gpus`
    attainment_below: float | None = None  # best at gpus - 1 (None when gpus is the minimum)
    runs: int = 0
    tried: list = field(default_factory=list)  # (gpus, split, attainment)

    def as_dict(self) -> dict:
        d = {"gpus": self.gpus, "attainment": round(self.attainment, 4)}
        if self.system == "distserve":
            d["split"] = self.split
        d["attainment_at_gpus_minus_1"] = (
            None if self.attainment_below is None else round(self.attainment_below, 4)
        )
        d["runs"] = self.runs
        return d


def _splits(g: int, hint: float) -> list[tuple[int, int]]:
    """Every p:d with p + d = g, the ones nearest the hinted prefill share first."""
    return sorted(((p, g - p) for p in range(1, g)), key=lambda s: abs(s[0] / g - hint))


def min_gpus(plan: Plan, system: str, rate: float, start: int = 1, hint: float = 0.4) -> Answer:
    """Fewest GPUs with attainment >= plan.target at `rate`, searching up from `start`."""
    low = 2 if system == "distserve" else 1
    ans = Answer(system, rate, None)
    best_at: dict[int, tuple[float, str | None]] = {}

    def best(g: int) -> tuple[float, str | None]:
        """Best attainment on g GPUs (distserve: over splits, stopping at the first pass)."""
        if g in best_at:
            return best_at[g]
        top: tuple[float, str | None] = (-1.0, None)
        for split in _splits(g, hint) if system == "distserve" else [None]:
            m = run_system(plan, system, rate, g, split)
            name = f"{split[0]}:{split[1]}" if split else None
            ans.runs += 1
            ans.tried.append((g, name, round(m.slo_attainment, 4)))
            if m.slo_attainment > top[0]:
                top = (m.slo_attainment, name)
            if m.slo_attainment >= plan.target:
                break
        best_at[g] = top
        return top

    g = max(low, start)
    while g <= plan.max_gpus and best(g)[0] < plan.target:
        g += 1
    if g > plan.max_gpus:
        ans.attainment = best_at.get(plan.max_gpus, (0.0, None))[0]
        return ans
    while g > low and best(g - 1)[0] >= plan.target:  # started above the minimum
        g -= 1
    ans.gpus = g
    ans.attainment, ans.split = best_at[g]
    if g > low:
        ans.attainment_below = best(g - 1)[0]
    return ans


def plan_rates(plan: Plan, system: str, rates: list[float]) -> dict[float, Answer]:
    """min_gpus at each rate (ascending): each search starts at the previous answer (a higher
    rate needs at least as many GPUs) and still checks one fewer."""
    out: dict[float, Answer] = {}
    start, hint = 1, 0.4
    for rate in sorted(rates):
        a = min_gpus(plan, system, rate, start=start, hint=hint)
        out[rate] = a
        if a.gpus is not None:
            start = a.gpus
            if a.split:
                p, d = map(int, a.split.split(":"))
                hint = p / (p + d)
        else:
            start = plan.max_gpus + 1  # higher rates cannot pass either
    return out


def ratio(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else a / b


def plot(results: dict[str, dict[float, Answer]], title: str, path: str | Path) -> None:
    """GPUs needed vs target rate, one line per system (missing points: over max_gpus)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"ecoserve": ("o", "-", 9), "distserve": ("s", "--", 7), "vllm": ("^", ":", 6)}
    for system, answers in results.items():
        rates = sorted(answers)
        gpus = [answers[r].gpus if answers[r].gpus is not None else math.nan for r in rates]
        marker, line, size = styles.get(system, ("x", "-", 6))  # equal answers stay visible
        ax.plot(rates, gpus, marker=marker, linestyle=line, markersize=size, label=system)
    ax.set_xlabel("target rate (req/s)")
    ax.set_ylabel("GPUs needed (>= target SLO attainment)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["SYSTEMS", "Answer", "Plan", "min_gpus", "plan_rates", "plot", "run_system"]
