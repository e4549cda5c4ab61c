"""Simulated policy benchmark: max rate at 90% SLO attainment and latency at a common rate.

For each trace (sharegpt, azure_conv) and policy (ecoserve, vllm, sarathi, orca, sjf) on the
Llama-2-7B / A100-80GB cost model:

* `max_rate_at_slo90`: the highest Poisson rate (req/s) at which >= 90% of requests meet their
  SLO (doubling from `lo`, then bisection to `rel_tol`; `sweep.max_rate_at_slo`).
* every metric of one run at a common rate: vLLM's max_rate_at_slo90 on that trace (so vLLM sits
  at 90% attainment there and the others are compared at the same load).
* full mode adds a rate sweep (0.25x to 1.5x of the common rate), an EcoServe ablation on
  sharegpt, and PNG plots.

SLO: JCT <= slo_k x the request's unloaded JCT on the same profile (DESIGN.md section 4).

    python bench/sim.py [--quick] --out DIR [--data-dir D] [--jobs N] [--n N]

Writes DIR/summary.json and DIR/summary.md (and DIR/*.png in full mode). bench/README.md says
more. Work runs in a process pool over (trace, policy) searches and runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
try:
    import ecoserve_scheduler  # noqa: F401
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, str(REPO / "services" / "scheduler"))

from ecoserve_scheduler.sim.cost_model import load_profile  # noqa: E402
from ecoserve_scheduler.sim.sweep import (  # noqa: E402
    Scenario,
    max_rate_at_slo,
    simulate_at,
    workload,
)
from ecoserve_scheduler.sim.workload import DataMissing  # noqa: E402

# Sibling modules (sim_report, sim_pool): importable however this file is run or loaded.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_pool import _Progress, _Runner  # noqa: E402
from sim_report import (  # noqa: E402,F401
    ABLATION_TRACE,
    ABLATIONS,
    BASELINE,
    MD_COLUMNS,
    POLICIES,
    PROFILE,
    SWEEP_FACTORS,
    TARGET,
    TRACES,
    _ablation_dict,
    _plots,
    render_markdown,
)


@dataclass(frozen=True)
class BenchConfig:
    mode: str = "quick"  # quick | full
    n: int = 200
    traces: tuple[str, ...] = TRACES
    policies: tuple[str, ...] = POLICIES
    lo: float = 2.0
    hi: float = 64.0
    rel_tol: float = 0.1
    seed: int = 0
    slo_k: float = 5.0
    rl_model: str = "noisy"
    data_dir: str | None = None
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    sweep: bool = False
    ablation: bool = False
    plots: bool = False
    progress: bool = True
    profile: str = PROFILE

    def scenario(self, trace: str) -> Scenario:
        return Scenario(
            trace=trace,
            n=self.n,
            seed=self.seed,
            profile=self.profile,
            rl_model=self.rl_model,
            slo_k=self.slo_k,
            data_dir=self.data_dir,
            fallback=True,
        )


def quick_config(**changes) -> BenchConfig:
    return replace(BenchConfig(mode="quick", n=400, lo=2.0, rel_tol=0.1), **changes)


def full_config(**changes) -> BenchConfig:
    base = BenchConfig(
        mode="full", n=1000, lo=1.0, rel_tol=0.05, sweep=True, ablation=True, plots=True
    )
    return replace(base, **changes)


# ---- work done in the pool (top-level functions, so they pickle) ---------------------------


def _search_task(sc: Scenario, policy: str, options: dict, lo: float, hi: float, rel_tol: float):
    """max_rate_at_slo90 and every run the search made; ("skipped", reason) without the data."""
    t0 = time.perf_counter()
    try:
        rate, seen = max_rate_at_slo(sc, policy, options, TARGET, lo, hi, rel_tol)
        # `lo` already misses the target: search below it (twice at most) instead of reporting 0.
        for _ in range(2):
            if rate > 0:
                break
            top, lo = lo, lo / 4
            rate, more = max_rate_at_slo(sc, policy, options, TARGET, lo, top, rel_tol)
            seen.update(more)
    except DataMissing as e:
        return "skipped", str(e)
    runs = {r: m.as_dict() for r, m in seen.items()}
    return "ok", (rate, runs, time.perf_counter() - t0)


def _run_task(sc: Scenario, policy: str, rate: float, options: dict, want_jcts: bool):
    """One simulation (sweep.simulate_at), keeping per-request JCTs when asked."""
    try:
        _, source = workload(sc, rate)
    except DataMissing as e:
        return "skipped", str(e)
    metrics, per_request = simulate_at(sc, policy, rate, options)
    # Unfinished requests never complete: infinite JCT (the CDF stays below 1).
    jcts = None
    if want_jcts:
        jcts = [m.jct_s if m.jct_s is not None else math.inf for m in per_request]
    return "ok", (metrics.as_dict(), jcts, source)


def _rate_key(rate: float) -> str:
    return f"{rate:.6g}"


def _clean(v):
    """JSON-safe: NaN/inf -> None, recursively."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


def _ratio(a, b) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return round(a / b, 4)


def run_bench(cfg: BenchConfig, out: str | Path) -> dict:
    """Run the benchmark, write OUT/summary.json and OUT/summary.md (and plots); return the dict."""
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    baseline = BASELINE if BASELINE in cfg.policies else cfg.policies[0]
    sc_of = {t: cfg.scenario(t) for t in cfg.traces}

    search: dict[tuple[str, str], tuple] = {}  # (trace, policy) -> (rate, runs, wall)
    common: dict[str, float] = {}  # trace -> common rate
    at_common: dict[tuple[str, str], dict] = {}  # (trace, policy) -> metrics at common rate
    jcts: dict[tuple[str, str], list[float]] = {}
    sources: dict[str, str] = {}
    skipped: dict[str, str] = {}
    sweep: dict[str, dict[str, dict[str, dict]]] = {}
    abl_search: dict[str, tuple] = {}
    abl_common: dict[str, dict] = {}
    do_ablation = cfg.ablation and ABLATION_TRACE in cfg.traces and "ecoserve" in cfg.policies

    progress = _Progress(cfg.progress)
    runner = _Runner(max(1, cfg.jobs), progress.add)

    def search_args(trace: str, policy: str, options: dict) -> tuple:
        return (sc_of[trace], policy, options, cfg.lo, cfg.hi, cfg.rel_tol)

    # Baseline searches first: the common rate, and everything keyed on it, waits on them.
    for trace in cfg.traces:
        runner.submit(("search", trace, baseline), _search_task, *search_args(trace, baseline, {}))
    if do_ablation:
        for name, opts in ABLATIONS.items():
            if opts:
                args = search_args(ABLATION_TRACE, "ecoserve", opts)
                runner.submit(("abl_search", ABLATION_TRACE, name), _search_task, *args)
    for trace in cfg.traces:
        for p in cfg.policies:
            if p != baseline:
                runner.submit(("search", trace, p), _search_task, *search_args(trace, p, {}))

    def common_run(trace: str, policy: str) -> None:
        """Metrics at the common rate: reuse the search's run there, unless JCTs are needed."""
        rate = common[trace]
        runs = search[(trace, policy)][1]
        if not cfg.plots and rate in runs:
            at_common[(trace, policy)] = runs[rate]
        else:
            args = (sc_of[trace], policy, rate, {}, cfg.plots)
            runner.submit(("common", trace, policy), _run_task, *args)

    def on_common_rate(trace: str) -> None:
        rate = common[trace]
        runner.submit(("source", trace, baseline), _source_task, sc_of[trace], rate)
        for p in cfg.policies:
            if (trace, p) in search:
                common_run(trace, p)
        if cfg.sweep:
            sweep[trace] = {p: {} for p in cfg.policies}
            for f in SWEEP_FACTORS:
                r = round(f * rate, 3)
                for p in cfg.policies:
                    runner.submit(("sweep", trace, p, r), _run_task, sc_of[trace], p, r, {}, False)
        if do_ablation and trace == ABLATION_TRACE:
            for name, opts in ABLATIONS.items():
                if opts:
                    args = (sc_of[trace], "ecoserve", rate, opts, False)
                    runner.submit(("abl_common", trace, name), _run_task, *args)

    try:
        while runner:
            key, (status, payload) = runner.next()
            kind, trace = key[0], key[1]
            progress.done(" ".join(str(k) for k in key))
            if status == "skipped":
                skipped.setdefault(trace, payload)
                continue
            if trace in skipped:
                continue
            if kind == "search":
                policy = key[2]
                search[(trace, policy)] = payload
                if policy == baseline:
                    rate, runs, _ = payload
                    common[trace] = rate if rate > 0 else min(runs)
                    on_common_rate(trace)
                elif trace in common:
                    common_run(trace, policy)
            elif kind == "common":
                metrics, per, _ = payload
                at_common[(trace, key[2])] = metrics
                if per is not None:
                    jcts[(trace, key[2])] = per
            elif kind == "source":
                sources[trace] = payload
            elif kind == "sweep":
                sweep[trace][key[2]][_rate_key(key[3])] = payload[0]
            elif kind == "abl_search":
                abl_search[key[2]] = payload
            elif kind == "abl_common":
                abl_common[key[2]] = payload[0]
    finally:
        runner.close()
        progress.stop()

    traces_out: dict[str, dict] = {}
    for trace in cfg.traces:
        if trace in skipped:
            traces_out[trace] = {"skipped": skipped[trace]}
            continue
        t: dict[str, Any] = {}
        for p in cfg.policies:
            t[p] = {"max_rate_at_slo90": search[(trace, p)][0], **at_common[(trace, p)]}
        e, b = t.get("ecoserve"), t.get(baseline)
        t["_common_rate"] = common[trace]
        t["_workload"] = sources.get(trace, "")
        if e is not None and b is not None and baseline != "ecoserve":
            t["_ratios"] = {
                f"max_rate_ecoserve_over_{baseline}": _ratio(
                    e["max_rate_at_slo90"], b["max_rate_at_slo90"]
                ),
                f"mean_jct_ecoserve_over_{baseline}": _ratio(e["mean_jct_s"], b["mean_jct_s"]),
            }
        t["_search"] = {
            "target": TARGET,
            "lo": cfg.lo,
            "hi": cfg.hi,
            "rel_tol": cfg.rel_tol,
            "common_rate_policy": baseline,
            "rates_tried": {p: sorted(search[(trace, p)][1]) for p in cfg.policies},
            "search_wall_s": {p: round(search[(trace, p)][2], 3) for p in cfg.policies},
        }
        traces_out[trace] = t

    sc0 = cfg.scenario(cfg.traces[0]) if cfg.traces else Scenario()
    summary: dict[str, Any] = {
        "traces": traces_out,
        "slo": {
            "kind": "jct",
            "k": sc0.slo_k,
            "definition": "JCT <= k x the request's unloaded JCT on the same profile "
            "(cost model, batch of one)",
        },
        "profile": load_profile(cfg.profile).name,
        "mode": cfg.mode,
        "n_requests": cfg.n,
        "rl_model": cfg.rl_model,
        "wall_s": 0.0,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "jobs": cfg.jobs,
            "seed": cfg.seed,
        },
    }
    if cfg.sweep:
        summary["sweep"] = {t: sweep[t] for t in cfg.traces if t in sweep and t not in skipped}
    if do_ablation and ABLATION_TRACE not in skipped:
        abl_trace = traces_out[ABLATION_TRACE]
        summary["ablation"] = _ablation_dict(abl_trace, abl_search, abl_common)
    if cfg.plots:
        summary_plots = _plots(out, summary, jcts, cfg.policies, baseline)
        summary["machine"]["plots"] = summary_plots
    summary["wall_s"] = round(time.perf_counter() - t_start, 2)
    summary = _clean(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(render_markdown(summary, cfg.policies, baseline))
    return summary


def _source_task(sc: Scenario, rate: float):
    try:
        return "ok", workload(sc, rate)[1]
    except DataMissing as e:
        return "skipped", str(e)


# ---- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small n, coarse search, no sweep/plots")
    ap.add_argument("--out", default=None, help="output folder (default results/sim[-quick])")
    ap.add_argument("--data-dir", default=None, help="default: $ECOSERVE_DATA_DIR, ../shared/data")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    ap.add_argument("--n", type=int, default=None, help="requests per run (quick 400, full 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-k", type=float, default=5.0, help="JCT SLO = k x unloaded JCT")
    ap.add_argument("--rl-model", default="noisy", help="oracle | noisy | alpaca")
    ap.add_argument("--traces", default=",".join(TRACES), help="comma-separated")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated")
    ap.add_argument("--profile", default=PROFILE, help="cost-model profile (ecoserve profiles)")
    ap.add_argument("--no-ablation", action="store_true", help="full mode without the ablation")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    data_dir = a.data_dir or os.environ.get("ECOSERVE_DATA_DIR")
    if data_dir is None and (REPO.parent / "shared" / "data").is_dir():
        data_dir = str(REPO.parent / "shared" / "data")  # ../shared/data from the repo root
    changes: dict[str, Any] = {
        "traces": tuple(a.traces.split(",")),
        "policies": tuple(a.policies.split(",")),
        "seed": a.seed,
        "slo_k": a.slo_k,
        "rl_model": a.rl_model,
        "data_dir": data_dir,
        "jobs": max(1, a.jobs),
        "progress": not a.no_progress,
        "profile": a.profile,
    }
    if a.no_ablation:
        changes["ablation"] = False
    if a.n is not None:
        changes["n"] = a.n
    cfg = quick_config(**changes) if a.quick else full_config(**changes)
    out = a.out or ("results/sim-quick" if a.quick else "results/sim")
    summary = run_bench(cfg, out)
    print(render_markdown(summary, cfg.policies))
    print(f"wall time {summary['wall_s']} s; wrote {Path(out) / 'summary.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
