"""bench/sim.py's constants and reports: the ablation table, summary.md and the plots."""

from __future__ import annotations

from pathlib import Path

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
