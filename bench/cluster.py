"""Cluster scale: GPUs each system needs for a goodput target, and one scheduler's plan rate.

1. Capacity plans (`ecoserve_scheduler.sim.planner`): for ShareGPT and the Azure conversation
   trace at a grid of target rates, the fewest GPUs with >= 90% SLO attainment for `ecoserve`
   (one scheduler, N workers, least-loaded placement), `distserve` (best prefill:decode split,
   KV over NVLink) and `vllm` (data-parallel replicas behind a least-loaded router). SLO: JCT
   <= 5 x unloaded JCT. Full mode adds two TTFT/TPOT scenarios (DistServe's kind of SLO):
   ShareGPT, and a long-prompt trace (synthetic: 1500-3500-token prompts, 20-200 outputs).
2. Scheduler scale: one SchedulerCore (EcoServe policy) over W simulated workers, W = 1..64,
   each loaded at about its sustainable rate; wall time per plan in schedule (placement split
   out) and apply, plans/s one process produces, and the plans/s W workers need at their
   natural step rate (W / mean simulated step time).

Writes results/cluster/summary.json (`traces` and `scale` in the issue's shape, more beside),
summary.md and gpus_vs_rate_<scenario>.png. The scale measurement is in cluster_scale.py, the
targets and the report in cluster_report.py.

    python bench/cluster.py [--quick] [--out results/cluster] [--data-dir D] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ecoserve_common.cost import CostModel, load_profile
from ecoserve_scheduler.sim import planner
from ecoserve_scheduler.sim.distserve import DistConfig, DistServeSim
from ecoserve_scheduler.sim.engine import simulate_with_log
from ecoserve_scheduler.sim.rl_models import make_rl_model
from ecoserve_scheduler.sim.workload import TraceRecord, save_trace_file

# The scale measurement and the report are this script's sibling modules (bench/ is no package):
# importable however this file is run or loaded.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_report import PROFILE, SYSTEMS, markdown, targets  # noqa: E402
from cluster_scale import TimedLeastLoaded, measure_scale  # noqa: E402

__all__ = [
    "PROFILE",
    "SYSTEMS",
    "Case",
    "TimedLeastLoaded",
    "cases",
    "main",
    "markdown",
    "measure_scale",
    "plan_one",
    "targets",
    "utilisation",
]

RL = make_rl_model("noisy")


@dataclass(frozen=True)
class Case:
    """One planning scenario: a trace, an SLO and a rate grid."""

    name: str
    plan: planner.Plan
    rates: tuple[float, ...]
    primary: bool  # part of summary["traces"] (the shape)
    systems: tuple[str, ...] = SYSTEMS


def long_prompt_trace(path: Path, n: int = 6000, seed: int = 0) -> Path:
    """Long prompts, short answers (summarisation-like): where disaggregation should help."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0, n))
    prompts, outputs = rng.integers(1500, 3500, n), rng.integers(20, 200, n)
    recs = [
        TraceRecord(float(a), int(p), int(o)) for a, p, o in zip(t, prompts, outputs, strict=True)
    ]
    save_trace_file(recs, path)
    return path


def cases(quick: bool, data_dir: str | None, out: Path) -> list[Case]:
    base = planner.Plan(
        n=200 if quick else 600,
        duration_s=40.0 if quick else 240.0,
        profile=PROFILE,
        data_dir=data_dir,
        max_gpus=16 if quick else 24,
    )
    if quick:
        grid = {"sharegpt": (4.0, 12.0), "azure_conv": (4.0, 12.0)}
    else:
        grid = {
            "sharegpt": (2.0, 5.0, 10.0, 20.0, 30.0, 40.0),
            "azure_conv": (2.0, 5.0, 10.0, 20.0, 30.0),
        }
    out_cases = [
        Case(trace, replace(base, trace=trace), rates, True) for trace, rates in grid.items()
    ]
    if not quick:
        tight = replace(base, slo="ttft-tpot", ttft_s=0.5, tpot_s=0.04)
        out_cases.append(
            Case(
                "sharegpt_ttft0.5_tpot0.04",
                replace(tight, trace="sharegpt"),
                grid["sharegpt"][:4],
                False,
            )
        )
        sharegpt = out_cases[0].plan
        # Sensitivity: DistServe's KV over a 100 Gb/s network instead of NVLink; EcoServe with
        # the placement that existed before (whichever idle worker asks first).
        out_cases.append(
            Case(
                "sharegpt_distserve_net-100g",
                replace(sharegpt, link="net-100g"),
                grid["sharegpt"],
                False,
                ("distserve",),
            )
        )
        out_cases.append(
            Case(
                "sharegpt_ecoserve_first-idle",
                replace(sharegpt, placement="first-idle"),
                grid["sharegpt"],
                False,
                ("ecoserve",),
            )
        )
        tighter = replace(base, trace="sharegpt", slo="ttft-tpot", ttft_s=0.25, tpot_s=0.03)
        out_cases.append(Case("sharegpt_ttft0.25_tpot0.03", tighter, (5.0, 10.0, 20.0), False))
        trace = long_prompt_trace(out / "long_prompt_trace.csv")
        long_slo = replace(base, trace=str(trace), slo="ttft-tpot", ttft_s=0.4, tpot_s=0.025)
        out_cases.append(
            Case("long_prompt_ttft0.4_tpot0.025", long_slo, (1.0, 2.0, 4.0, 8.0), False)
        )
    return out_cases


def plan_one(case: Case, system: str) -> tuple[str, str, dict, float]:
    t0 = time.perf_counter()
    answers = planner.plan_rates(case.plan, system, list(case.rates))
    dt = time.perf_counter() - t0
    return case.name, system, {f"{r:g}": a.as_dict() for r, a in answers.items()}, dt


def utilisation(plan: planner.Plan, rate: float, row: dict) -> dict:
    """Why the counts differ: share of time each kind of GPU computes, at each system's answer
    (DistServe: prefill and decode GPUs apart), with mean TTFT and TPOT."""
    records, _ = planner.records_at(plan, rate)
    cost = CostModel(load_profile(plan.profile))
    out: dict = {}
    d = row["distserve"]
    if d["gpus"]:
        p, n = map(int, d["split"].split(":"))
        sim = DistServeSim(
            records, plan.sim_config("vllm"), DistConfig(p, n, link=plan.link), cost, RL
        )
        run, _ = sim.run()
        out["distserve"] = {
            "split": d["split"],
            "prefill_busy": round(sim.busy_s["prefill"] / (run.duration_s * p), 3),
            "decode_busy": round(sim.busy_s["decode"] / (run.duration_s * n), 3),
            "mean_ttft_s": round(run.mean_ttft_s, 4),
            "mean_tpot_s": round(run.mean_tpot_s, 4),
            "mean_kv_transfer_ms": round(1e3 * float(np.mean(sim.transfer_s or [0.0])), 3),
        }
    e = row["ecoserve"]["gpus"]
    if e:
        cfg = replace(plan.sim_config("ecoserve"), num_workers=e)
        run, _, log = simulate_with_log(records, cfg, cost, RL)
        out["ecoserve"] = {
            "gpus": e,
            "busy": round(sum(log.iter_time) / (run.duration_s * e), 3),
            "mean_ttft_s": round(run.mean_ttft_s, 4),
            "mean_tpot_s": round(run.mean_tpot_s, 4),
        }
    return out


def utilisation_task(name: str, plan: planner.Plan, rate: str, row: dict) -> tuple:
    return name, rate, utilisation(plan, float(rate), row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/cluster")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workers", type=int, nargs="+", default=None)
    ap.add_argument("--no-scale", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    all_cases = cases(a.quick, a.data_dir, out)
    summary: dict = {
        "mode": "quick" if a.quick else "full",
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}",
        "profile": PROFILE,
        "link": all_cases[0].plan.link,
        "target_attainment": all_cases[0].plan.target,
        "traces": {},
        "cases": {},
        "scale": {},
    }
    tasks = [(c, s) for c in all_cases for s in c.systems]
    tasks.sort(key=lambda t: t[1] != "distserve")  # the longest searches first
    found: dict[str, dict] = {}
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futures = [pool.submit(plan_one, c, s) for c, s in tasks]
        for f in futures:
            name, system, answers, dt = f.result()
            found.setdefault(name, {})[system] = answers
            print(f"plan {name:32s} {system:9s} {dt:6.1f} s", file=sys.stderr, flush=True)
    for c in all_cases:
        rows = {
            f"{r:g}": {s: found[c.name][s][f"{r:g}"] for s in c.systems} for r in sorted(c.rates)
        }
        plot = f"gpus_vs_rate_{c.name}.png"
        answers = {
            s: {r: planner.Answer(s, r, found[c.name][s][f"{r:g}"]["gpus"]) for r in c.rates}
            for s in c.systems
        }
        planner.plot(answers, f"{c.name}; {c.plan.slo_text()}; {PROFILE}", out / plot)
        summary["cases"][c.name] = {
            "trace": c.plan.trace,
            "slo": c.plan.slo_text(),
            "link": c.plan.link,
            "placement": c.plan.placement or "least-loaded",
            "requests": {f"{r:g}": c.plan.requests_at(r) for r in c.rates},
            "plot": plot,
            "rates": rows,
        }
        if c.primary:
            summary["traces"][c.name] = rows
    jobs = [
        (c.name, c.plan, rate, row)
        for c in all_cases
        if c.systems == SYSTEMS
        for rate, row in summary["cases"][c.name]["rates"].items()
    ]
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for name, rate, util in pool.map(utilisation_task, *zip(*jobs, strict=True)):
            summary["cases"][name]["rates"][rate]["utilisation"] = util
    if not a.no_scale:
        workers = a.workers or ([1, 4, 16, 64] if a.quick else [1, 2, 4, 8, 16, 32, 64])
        for w in workers:
            m = measure_scale(w, 5.0, 5.0 if a.quick else 40.0, a.data_dir)
            summary["scale"][str(w)] = m
            print(
                f"scale workers={w:3d} plans/s {m['plans_per_s']:8.0f} needed "
                f"{m['needed_plans_per_s']:6.0f} placement {m['placement_us_per_plan']} us",
                file=sys.stderr,
                flush=True,
            )
    summary["targets"] = targets(summary)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report = markdown(summary)
    (out / "summary.md").write_text(report)
    print(report)
    print(f"wrote {out / 'summary.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
