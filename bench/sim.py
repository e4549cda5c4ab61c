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
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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

TRACES = ("sharegpt", "azure_conv")
POLICIES = ("ecoserve", "vllm", "sarathi", "orca", "sjf")
PROFILE = "llama-2-7b_a100-80gb"
BASELINE = "vllm"  # its max rate at SLO90 is the common rate
TARGET = 0.9
SWEEP_FACTORS = tuple(0.25 + i * 1.25 / 7 for i in range(8))  # 8 evenly spaced, 0.25x..1.5x
ABLATION_TRACE = "sharegpt"
ABLATIONS: dict[str, dict] = {
    "ecoserve (default)": {},
    "no pipelining": {"pipelining": False},
    "no synced_groups": {"synced_groups": False},
    "no ordering": {"ordering": False},
    "no slo_guard": {"slo_guard": False},
    "oracle_rl": {"oracle_rl": True},
    "oracle_rl, no slo_guard": {"oracle_rl": True, "slo_guard": False},
    "pad_weight=0": {"pad_weight": 0.0},
    "pad_weight=0.5": {"pad_weight": 0.5},
    "pad_weight=1": {"pad_weight": 1.0},
}
# (column title, metric key) of the Markdown tables; all at the common rate but the first.
MD_COLUMNS = (
    ("max rate @SLO90 (req/s)", "max_rate_at_slo90"),
    ("mean JCT (s)", "mean_jct_s"),
    ("p99 TTFT (s)", "p99_ttft_s"),
    ("preemptions", "preemptions"),
    ("SLO att.", "slo_attainment"),
    ("goodput (req/s)", "goodput_rps"),
    ("sched p99 (us/iter)", "sched_us_per_iter_p99"),
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


class _Runner:
    """Submit keyed tasks, take results as they finish; jobs == 1 runs them inline, in order."""

    def __init__(self, jobs: int, on_submit: Callable[[], None]):
        self._pool = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else None
        self._futures: dict[Future, Any] = {}
        self._inline: deque = deque()
        self._on_submit = on_submit

    def submit(self, key, fn, *args) -> None:
        self._on_submit()
        if self._pool is None:
            self._inline.append((key, fn, args))
        else:
            self._futures[self._pool.submit(fn, *args)] = key

    def __bool__(self) -> bool:
        return bool(self._futures or self._inline)

    def next(self):
        if self._pool is None:
            key, fn, args = self._inline.popleft()
            return key, fn(*args)
        done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
        fut = next(iter(done))
        return self._futures.pop(fut), fut.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """A rich bar on stderr; one line per finished task when stderr is not a terminal."""

    def __init__(self, enabled: bool):
        self._bar = None
        self._console = None
        self._total = self._done = 0
        self._t0 = time.perf_counter()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._console = Console(stderr=True)
        if self._console.is_terminal:
            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self._console,
            )
            self._task = self._bar.add_task("bench-sim", total=0)
            self._bar.start()

    def add(self) -> None:
        self._total += 1
        if self._bar is not None:
            self._bar.update(self._task, total=self._total)

    def done(self, what: str) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=what)
        elif self._console is not None:
            dt = time.perf_counter() - self._t0
            print(f"[{self._done}/{self._total} {dt:6.1f}s] {what}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ---- the benchmark -------------------------------------------------------------------------


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


def _ablation_dict(trace_out: dict, abl_search: dict, abl_common: dict) -> dict:
    variants = {}
    for name, opts in ABLATIONS.items():
        if not opts:
            e = trace_out["ecoserve"]
            rate, m = e["max_rate_at_slo90"], e
        else:
            rate, m = abl_search[name][0], abl_common[name]
        variants[name] = {
            "options": opts,
            "max_rate_at_slo90": rate,
            "mean_jct_s": m["mean_jct_s"],
            "p99_ttft_s": m["p99_ttft_s"],
            "slo_attainment": m["slo_attainment"],
            "preemptions": m["preemptions"],
            "goodput_rps": m["goodput_rps"],
        }
    return {"trace": ABLATION_TRACE, "common_rate": trace_out["_common_rate"], "variants": variants}


# ---- reports -------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def render_markdown(summary: dict, policies=POLICIES, baseline: str = BASELINE) -> str:
    slo = summary["slo"]
    slo_text = slo["definition"].replace("k x", f"{slo['k']:g} x")
    lines = [
        f"# Simulated benchmark ({summary['mode']})",
        "",
        f"Profile {summary['profile']}; {summary['n_requests']} requests per run; "
        f"RL predictor `{summary['rl_model']}`; wall time {summary['wall_s']} s "
        f"({summary['machine']['jobs']} jobs on {summary['machine']['cpu_count']} CPUs).",
        "",
        f"SLO: {slo_text}. "
        f"Max rate = highest Poisson rate with >= {TARGET:.0%} attainment; the other columns are "
        f"one run at the common rate ({baseline}'s max rate on that trace).",
        "",
    ]
    for trace, t in summary["traces"].items():
        lines.append(f"## {trace}")
        lines.append("")
        if "skipped" in t:
            lines += [f"Skipped: {t['skipped']}", ""]
            continue
        lines += [f"Workload: {t['_workload']}. Common rate: {_fmt(t['_common_rate'])} req/s.", ""]
        lines.append("| policy | " + " | ".join(c for c, _ in MD_COLUMNS) + " |")
        lines.append("|---|" + "---:|" * len(MD_COLUMNS))
        for p in policies:
            if p in t:
                cells = " | ".join(_fmt(t[p].get(k)) for _, k in MD_COLUMNS)
                lines.append(f"| {p} | {cells} |")
        lines.append("")
        ratios = t.get("_ratios")
        if ratios:
            lines.append(
                f"Headline: ecoserve/{baseline} max rate @SLO90 = "
                f"{_fmt(ratios[f'max_rate_ecoserve_over_{baseline}'])}x; mean JCT at the common "
                f"rate = {_fmt(ratios[f'mean_jct_ecoserve_over_{baseline}'])}x (lower is better)."
            )
            lines.append("")
    abl = summary.get("ablation")
    if abl:
        lines += [
            f"## Ablation: ecoserve on {abl['trace']}",
            "",
            f"Mean JCT etc. at the common rate {_fmt(abl['common_rate'])} req/s.",
            "",
            "| variant | max rate @SLO90 (req/s) | mean JCT (s) | p99 TTFT (s) | SLO att. |"
            " preemptions |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, v in abl["variants"].items():
            cols = ("max_rate_at_slo90", "mean_jct_s", "p99_ttft_s", "slo_attainment")
            vals = [_fmt(v[k]) for k in (*cols, "preemptions")]
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        lines.append("")
    plots = summary["machine"].get("plots")
    if plots:
        lines += ["## Plots", ""] + [f"- [{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _plots(out: Path, summary: dict, jcts: dict, policies, baseline: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written: list[str] = []
    order = list(policies)
    # One colour and line style per policy in every plot; styles differ so that identical
    # curves (e.g. two policies that schedule alike) stay visible.
    dashes = ("-", "--", ":", "-.")
    style = {
        p: {"color": f"C{i}", "linestyle": dashes[i % len(dashes)], "label": p}
        for i, p in enumerate(order)
    }

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)

    k = summary["slo"]["k"]
    for trace, per_policy in summary.get("sweep", {}).items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for p, runs in per_policy.items():
            # In rate order: past saturation throughput stalls while latency climbs.
            pts = [runs[r] for r in sorted(runs, key=float)]
            x = [m["throughput_rps"] for m in pts]
            axes[0].plot(x, [m["mean_jct_s"] for m in pts], marker="o", **style[p])
            axes[1].plot(x, [m["p99_jct_s"] for m in pts], marker="o", **style[p])
        for ax, what in zip(axes, ("mean JCT (s)", "p99 JCT (s)"), strict=True):
            ax.set_xlabel("throughput (finished req/s)")
            ax.set_ylabel(what)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{trace}: latency vs throughput ({summary['profile']})")
        save(fig, f"latency_vs_throughput_{trace}.png")

        fig, ax = plt.subplots(figsize=(6, 4.2))
        for p, runs in per_policy.items():
            rates = sorted(runs, key=float)
            att = [runs[r]["slo_attainment"] for r in rates]
            ax.plot([float(r) for r in rates], att, marker="o", **style[p])
        ax.axhline(TARGET, color="grey", ls="--", lw=1)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"SLO attainment (JCT <= {k:g} x unloaded)")
        ax.set_title(f"{trace}: SLO attainment vs rate")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, f"slo_attainment_vs_rate_{trace}.png")

    for trace, t in summary["traces"].items():
        if "skipped" in t:
            continue
        series = {p: jcts[(trace, p)] for p in order if (trace, p) in jcts}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for p, v in series.items():
            xs = np.sort(np.asarray(v, dtype=float))
            ys = np.arange(1, len(xs) + 1) / len(xs)
            fin = np.isfinite(xs)
            ax.step(xs[fin], ys[fin], where="post", **style[p])
        ax.set_xscale("log")
        ax.set_xlabel("JCT (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{trace}: JCT CDF at {t['_common_rate']:.3g} req/s ({baseline} @SLO90)")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, f"jct_cdf_{trace}.png")
    return written


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
