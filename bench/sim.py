"""Simulated policy benchmark: max rate at 90% SLO attainment per trace x profile x SLO x policy.

For each trace (sharegpt, azure_conv, sharegpt_long, sharegpt_multiturn), cost-model profile
(Llama-2-7B/13B on A100-80GB/40GB), SLO definition (jct, ttft-tpot, two-class) and policy
(ecoserve with predicted lengths and with oracle lengths, vllm, vllm-v0, sarathi, orca, sjf):

* `max_rate_at_slo90`: the highest Poisson rate (req/s) at which >= 90% of requests meet the
  SLO (`sweep.search_max_rate`; bench/sim_grid.py says how searches share work).
* every metric of one run at the cell's common rate (vLLM's max rate under the JCT SLO): SLO
  attainment under each definition (per class for two-class), latency, KV usage (mean / max),
  preemptions.
* full mode adds a rate sweep and plots on the primary profile and an EcoServe ablation.

A name that is not registered (policy, profile, workload) is skipped with a note in the summary.

    python bench/sim.py [--quick] --out DIR [--data-dir D] [--jobs N] [--n N]

Writes DIR/summary.json and DIR/summary.md (and DIR/*.png in full mode); bench/README.md says
more. Work runs in a process pool.
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
from ecoserve_scheduler.sim.sweep import Scenario  # noqa: E402

# Sibling modules: importable however this file is run or loaded.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_grid import (  # noqa: E402
    TARGETS_RULE,
    TWO_CLASS_RULE,
    ablation_summary,
    cell_summary,
    run_grid,
)
from sim_plots import plots as _plots  # noqa: E402
from sim_pool import _Progress, _Runner  # noqa: E402
from sim_report import (  # noqa: E402,F401
    ABLATION_CELLS,
    ABLATIONS,
    BASELINE,
    CORE_POLICIES,
    POLICIES,
    PROFILE,
    PROFILES,
    QUICK_TRACES,
    SLO_BLIND,
    SLOS,
    SWEEP_FACTORS,
    TARGET,
    TRACES,
    VARIANTS,
    render_markdown,
)


@dataclass(frozen=True)
class BenchConfig:
    mode: str = "quick"  # quick | full
    n: int = 200
    traces: tuple[str, ...] = TRACES
    profiles: tuple[str, ...] = PROFILES  # the first is the primary profile
    policies: tuple[str, ...] = POLICIES  # on the primary profile
    other_policies: tuple[str, ...] = CORE_POLICIES  # on the other profiles
    slos: tuple[str, ...] = SLOS
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

    def scenario(self, trace: str, profile: str) -> Scenario:
        return Scenario(
            trace=trace,
            n=self.n,
            seed=self.seed,
            profile=profile,
            rl_model=self.rl_model,
            slo_k=self.slo_k,
            data_dir=self.data_dir,
            fallback=True,
        )


def quick_config(**changes) -> BenchConfig:
    base = BenchConfig(
        mode="quick", n=400, lo=2.0, rel_tol=0.1, traces=QUICK_TRACES, profiles=(PROFILE,)
    )
    return replace(base, **changes)


def full_config(**changes) -> BenchConfig:
    base = BenchConfig(
        mode="full", n=1000, lo=1.0, rel_tol=0.05, sweep=True, ablation=True, plots=True
    )
    return replace(base, **changes)


def _clean(v):
    """JSON-safe: NaN/inf -> None, recursively."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    return v


def _setup(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "slo_definitions": {
            "jct": {
                "kind": "jct",
                "k": cfg.slo_k,
                "definition": f"JCT <= {cfg.slo_k:g} x the request's unloaded JCT on the same "
                "profile (cost model, batch of one)",
            },
            "ttft-tpot": {
                "kind": "ttft-tpot",
                "definition": "TTFT <= ttft_s and TPOT <= tpot_s, per trace x profile "
                "(`_slo_targets` of each cell)",
                "reasoning": TARGETS_RULE,
            },
            "two-class": {
                "kind": "ttft-tpot",
                "definition": "interactive / batch classes of TTFT and TPOT targets "
                "(`_slo_targets.two_class` of each cell); attainment per class in `classes`",
                "reasoning": TWO_CLASS_RULE,
            },
        },
        "slos": list(cfg.slos),
        "common_rate_rule": f"Common rate of a trace x profile: {BASELINE}'s max rate under the "
        "`jct` SLO; every policy's metrics there, scored under each SLO definition.",
        "traces": list(cfg.traces),
        "profiles": {p: (load_profile(p).name if _known(p) else None) for p in cfg.profiles},
        "policies_primary_profile": list(cfg.policies),
        "policies_other_profiles": list(cfg.other_policies),
        "variants": {k: {"policy": v[0], "options": v[1]} for k, v in VARIANTS.items()},
        "slo_blind_policies": sorted(SLO_BLIND),
        "search": {
            "target": TARGET,
            "lo": cfg.lo,
            "hi": cfg.hi,
            "rel_tol": cfg.rel_tol,
            "rule": f"{BASELINE}: from lo, doubling then bisection; every other policy from "
            f"{BASELINE}'s answer for the same SLO, steps x1.25 (growing to x2), then "
            "bisection; rates at 4 significant digits",
        },
        "command": " ".join(sys.argv),
    }


def _known(profile: str) -> bool:
    try:
        load_profile(profile)
    except KeyError:
        return False
    return True


def run_bench(cfg: BenchConfig, out: str | Path) -> dict:
    """Run the benchmark, write OUT/summary.json and OUT/summary.md (and plots); return the dict."""
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = _Progress(cfg.progress)
    runner = _Runner(max(1, cfg.jobs), progress.add)
    try:
        got = run_grid(cfg, runner, progress)
    finally:
        runner.close()
        progress.stop()

    traces_out: dict[str, dict] = {}
    for trace in cfg.traces:
        if trace in got["trace_skips"]:
            traces_out[trace] = {"skipped": got["trace_skips"][trace]}
            continue
        cells = [c for c in got["cells"] if c.trace == trace]
        traces_out[trace] = {c.profile: cell_summary(c) for c in cells if c.common is not None}
    primary = cfg.profiles[0] if cfg.profiles else PROFILE
    summary: dict[str, Any] = {
        "format": 2,
        "traces": traces_out,
        "skipped": {k: v for k, v in got["skipped"].items() if v},
        "setup": _setup(cfg),
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
        summary["sweep"] = {"profile": primary, "traces": got["sweep"]}
    ablations = []
    for a_trace, a_profile, slo in ABLATION_CELLS if cfg.ablation else ():
        for c in got["cells"]:
            here = c.profile == a_profile if a_profile else c.primary
            abl = got["ablation"].get((c.trace, c.profile))
            if here and c.trace == a_trace and c.common is not None and abl:
                ablations.append(ablation_summary(c, abl, slo))
    if ablations:
        summary["ablation"] = ablations[0]  # the compute-bound one, as before
        summary["ablations"] = ablations
    if cfg.plots:
        cdf = {c.trace: c.common for c in got["cells"] if c.primary and c.common is not None}
        summary["machine"]["plots"] = _plots(out, summary, got["jcts"], cdf, cfg.policies)
    summary["wall_s"] = round(time.perf_counter() - t_start, 2)
    summary = _clean(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(render_markdown(summary))
    return summary


# ---- command line --------------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


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
    ap.add_argument("--traces", default=None, help="comma-separated (quick: sharegpt,azure_conv)")
    ap.add_argument(
        "--profiles", "--profile", default=None, help="comma-separated; the first is the primary"
    )
    ap.add_argument("--policies", default=None, help="comma-separated, primary profile")
    ap.add_argument("--other-policies", default=None, help="comma-separated, other profiles")
    ap.add_argument("--slos", default=",".join(SLOS), help="comma-separated SLO definitions")
    ap.add_argument("--no-ablation", action="store_true", help="full mode without the ablation")
    ap.add_argument("--no-sweep", action="store_true", help="full mode without sweep and plots")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    data_dir = a.data_dir or os.environ.get("ECOSERVE_DATA_DIR")
    if data_dir is None and (REPO.parent / "shared" / "data").is_dir():
        data_dir = str(REPO.parent / "shared" / "data")  # ../shared/data from the repo root
    slos = _names(a.slos)
    if set(slos) - set(SLOS):
        raise SystemExit(f"unknown SLO definitions {sorted(set(slos) - set(SLOS))}; know {SLOS}")
    changes: dict[str, Any] = {
        "slos": slos,
        "seed": a.seed,
        "slo_k": a.slo_k,
        "rl_model": a.rl_model,
        "data_dir": data_dir,
        "jobs": max(1, a.jobs),
        "progress": not a.no_progress,
    }
    for arg, key in (("traces", "traces"), ("profiles", "profiles"), ("policies", "policies"),
                     ("other_policies", "other_policies")):  # fmt: skip
        if getattr(a, arg) is not None:
            changes[key] = _names(getattr(a, arg))
    if a.no_ablation:
        changes["ablation"] = False
    if a.no_sweep:
        changes["sweep"] = changes["plots"] = False
    if a.n is not None:
        changes["n"] = a.n
    cfg = quick_config(**changes) if a.quick else full_config(**changes)
    out = a.out or ("results/sim-quick" if a.quick else "results/sim")
    summary = run_bench(cfg, out)
    print(render_markdown(summary))
    print(f"wall time {summary['wall_s']} s; wrote {Path(out) / 'summary.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
