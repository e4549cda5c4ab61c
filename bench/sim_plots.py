"""bench/sim.py's plots (PNG, matplotlib Agg), from the summary's sweep and the common-rate JCTs."""

from __future__ import annotations

from pathlib import Path

from sim_report import SWEEP_TRACES, TARGET


def plots(out: Path, summary: dict, jcts: dict, cdf_rates: dict, policies) -> list[str]:
    """Write the plots of the primary profile; return their file names."""
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

    sweep = summary.get("sweep", {})
    profile = sweep.get("profile", "")
    for trace, per_slo in sweep.get("traces", {}).items():
        if "jct" in per_slo:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
            for p, runs in per_slo["jct"].items():
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
                ax.legend(fontsize=7)
            fig.suptitle(f"{trace}: latency vs throughput ({profile}, `jct` runs)")
            save(fig, f"latency_vs_throughput_{trace}.png")

        fig, axes = plt.subplots(1, len(per_slo), figsize=(5.2 * len(per_slo), 4.2), squeeze=False)
        for ax, (slo, per_policy) in zip(axes[0], per_slo.items(), strict=True):
            for p, runs in per_policy.items():
                rates = sorted(runs, key=float)
                att = [runs[r]["slo_attainment"] for r in rates]
                ax.plot([float(r) for r in rates], att, marker="o", **style[p])
            ax.axhline(TARGET, color="grey", ls="--", lw=1)
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(f"SLO attainment ({slo})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{trace}: SLO attainment vs rate ({profile})")
        save(fig, f"slo_attainment_vs_rate_{trace}.png")

    for trace, rate in cdf_rates.items():
        if trace not in SWEEP_TRACES:  # the derived ShareGPT workloads: their tables suffice
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
        ax.set_title(f"{trace}: JCT CDF at {rate:.3g} req/s ({profile}, `jct` runs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, f"jct_cdf_{trace}.png")
    return written
