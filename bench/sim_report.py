"""bench/sim.py's constants and its Markdown report (summary.md)."""

from __future__ import annotations

# Names another change may not have registered yet are skipped with a note, not an error.
TRACES = ("sharegpt", "azure_conv", "sharegpt_long", "sharegpt_multiturn")
QUICK_TRACES = ("sharegpt", "azure_conv")
PROFILES = (
    "llama-2-7b_a100-80gb",
    "llama-2-13b_a100-80gb",
    "llama-2-7b_a100-40gb",
    "llama-2-13b_a100-40gb",
)
PROFILE = PROFILES[0]  # the primary profile: every policy, the sweep, the ablation, the plots
POLICIES = ("ecoserve", "ecoserve-oracle", "vllm", "vllm-v0", "sarathi", "orca", "sjf")
CORE_POLICIES = ("ecoserve", "ecoserve-oracle", "vllm", "vllm-v0")  # on the other profiles
# Bench names that are a registered policy with options.
VARIANTS: dict[str, tuple[str, dict]] = {"ecoserve-oracle": ("ecoserve", {"oracle_rl": True})}
# Policies whose schedule never reads a request's SLO (FCFS / length order): one run per rate
# is scored under every SLO definition (tests/test_sim_slo.py checks that this holds).
SLO_BLIND = frozenset({"vllm", "vllm-v0", "sarathi", "orca", "sjf"})
SLOS = ("jct", "ttft-tpot", "two-class")
BASELINE = "vllm"  # its max rate at SLO90 under "jct" is the common rate of a trace x profile
TARGET = 0.9
# TTFT/TPOT targets, DistServe-style: multiples of a typical request's unloaded TTFT and TPOT.
TTFT_X = 5.0
TPOT_X = 5.0
# The two-class mix: (name, share, TTFT and TPOT targets as multiples of the single-class ones).
TWO_CLASS = (("interactive", 0.5, 1.0, 1.0), ("batch", 0.5, 10.0, 2.0))
RATIO_PAIRS = (
    ("ecoserve", "vllm"),
    ("ecoserve", "vllm-v0"),
    ("ecoserve-oracle", "vllm"),
    ("ecoserve-oracle", "vllm-v0"),
    ("ecoserve", "ecoserve-oracle"),
)
SWEEP_FACTORS = tuple(0.25 + i * 1.25 / 7 for i in range(8))  # 8 evenly spaced, 0.25x..1.5x
SWEEP_TRACES = ("sharegpt", "azure_conv")
ABLATION_TRACE = "sharegpt"
# Where each component is ablated: (trace, profile or None for the primary one, SLO). The first
# is compute-bound (short prompts, 80 GB), the second KV-bound (long multi-turn prompts, 13B on
# 40 GB) under TTFT/TPOT targets, where reservation, pipelining and the overcommit matter.
ABLATION_CELLS: tuple[tuple[str, str | None, str], ...] = (
    (ABLATION_TRACE, None, "jct"),
    ("sharegpt_multiturn", "llama-2-13b_a100-40gb", "ttft-tpot"),
)
ABLATIONS: dict[str, dict] = {
    "ecoserve (default)": {},
    "no pipelining": {"pipelining": False},
    "no ordering": {"ordering": False},
    "no slo_guard": {"slo_guard": False},
    "no overcommit": {"overcommit_share": 0.0},
    "victims pass": {"pass_victims": True},
    "oracle_rl": {"oracle_rl": True},  # = the ecoserve-oracle column
    "oracle_rl, no slo_guard": {"oracle_rl": True, "slo_guard": False},
    "pad_weight=0": {"pad_weight": 0.0},
    "pad_weight=0.5": {"pad_weight": 0.5},
    "pad_weight=1": {"pad_weight": 1.0},
}


def ratio_key(a: str, b: str) -> str:
    return f"max_rate_{a}_over_{b}"


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


_KIND = {"policies": "policy", "profiles": "profile", "traces": "trace"}


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _policies(cells: dict) -> list[str]:
    """Policies present in any SLO table of a trace, in POLICIES order."""
    seen = {
        p
        for c in cells.values()
        if "skipped" not in c
        for s in SLOS
        if s in c
        for p in c[s]
        if not p.startswith("_")
    }
    return [p for p in POLICIES if p in seen] + sorted(seen - set(POLICIES))


def render_markdown(summary: dict) -> str:
    setup = summary["setup"]
    lines = [
        f"# Simulated benchmark ({summary['mode']})",
        "",
        f"{summary['n_requests']} requests per run; RL predictor `{summary['rl_model']}` "
        f"(`ecoserve-oracle`: the same policy on true lengths); wall time {summary['wall_s']} s "
        f"({summary['machine']['jobs']} jobs on {summary['machine']['cpu_count']} CPUs). "
        f"Max rate = highest Poisson rate with >= {TARGET:.0%} of requests in SLO.",
        "",
        "SLO definitions:",
        "",
    ]
    for name, d in setup["slo_definitions"].items():
        lines.append(f"- `{name}`: {d['definition']}")
    lines += ["", setup["common_rate_rule"], ""]
    for kind, notes in summary.get("skipped", {}).items():
        for name, why in notes.items():
            lines.append(f"- skipped {_KIND.get(kind, kind)} `{name}`: {why}")
    if summary.get("skipped"):
        lines.append("")
    lines += ["## max_rate_at_slo90 (req/s)", ""]
    for trace, t in summary["traces"].items():
        lines += [f"### {trace}", ""]
        if "skipped" in t:
            lines += [f"Skipped: {t['skipped']}", ""]
            continue
        pols = _policies(t)
        pairs = [(a, b) for a, b in RATIO_PAIRS if a in pols and b in pols]
        head = ["profile", "SLO", *pols, *(f"{a}/{b}" for a, b in pairs)]
        lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
        for profile, cell in t.items():
            if "skipped" in cell:
                lines.append(f"| {profile} | skipped: {cell['skipped']} |")
                continue
            for slo in SLOS:
                if slo not in cell:
                    continue
                row = cell[slo]
                rates = [_fmt(row[p]["max_rate_at_slo90"]) if p in row else "" for p in pols]
                ratios = [_fmt(row["_ratios"].get(ratio_key(a, b))) for a, b in pairs]
                lines.append(f"| {profile} | {slo} | " + " | ".join(rates + ratios) + " |")
        lines.append("")
    lines += _common_rate_tables(summary)
    for abl in summary.get("ablations") or [summary.get("ablation")]:
        lines += _ablation_table(abl)
    plots = summary["machine"].get("plots")
    if plots:
        lines += ["## Plots", ""] + [f"- [{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _common_rate_tables(summary: dict) -> list[str]:
    lines = [
        "## At the common rate",
        "",
        "Attainment under each SLO definition (two-class: all / interactive / batch); latency, KV "
        "and preemptions from the `jct` runs (the same run for SLO-blind policies). KV: reserved "
        "blocks / all blocks and written tokens / capacity, time-weighted mean / max.",
        "",
    ]
    head = (
        "| policy | att. jct | att. ttft-tpot | att. two-class (int. / batch) | mean JCT (s) | "
        "p99 TTFT (s) | p99 TPOT (s) | KV reserved mean / max | KV used mean / max | "
        "preemptions (requests) |"
    )
    for trace, t in summary["traces"].items():
        if "skipped" in t:
            continue
        for profile, cell in t.items():
            if "skipped" in cell or "jct" not in cell:
                continue
            tg = cell["_slo_targets"]
            lines += [
                f"### {trace}, {profile}: {_fmt(cell['_common_rate'])} req/s",
                "",
                f"Workload: {cell['_workload']}. Targets: TTFT {tg['ttft_s']:.3g} s, TPOT "
                f"{tg['tpot_s']:.3g} s (typical request {tg['ref_prompt_tokens']} prompt / "
                f"{tg['ref_output_tokens']} output tokens).",
                "",
                head,
                "|---|" + "---:|" * 9,
            ]
            for p in _policies({profile: cell}):
                lines.append(_common_row(cell, p))
            lines.append("")
    return lines


def _common_row(cell: dict, p: str) -> str:
    j = cell["jct"].get(p, {})
    att = {s: _pct(cell[s][p].get("slo_attainment")) for s in SLOS if s in cell and p in cell[s]}
    two = cell.get("two-class", {}).get(p, {})
    cls = two.get("classes") or {}
    two_txt = att.get("two-class", "")
    if cls:
        two_txt += " (" + " / ".join(_pct(c.get("slo_attainment")) for c in cls.values()) + ")"
    kv_r = f"{_fmt(j.get('kv_reserved_share'))} / {_fmt(j.get('kv_reserved_share_max'))}"
    kv_u = f"{_fmt(j.get('kv_used_share'))} / {_fmt(j.get('kv_used_share_max'))}"
    pre = f"{_fmt(j.get('preemptions'))} ({_fmt(j.get('preempted_requests'))})"
    cols = [
        att.get("jct", ""),
        att.get("ttft-tpot", ""),
        two_txt,
        _fmt(j.get("mean_jct_s")),
        _fmt(j.get("p99_ttft_s")),
        _fmt(j.get("p99_tpot_s")),
        kv_r,
        kv_u,
        pre,
    ]
    return f"| {p} | " + " | ".join(cols) + " |"


def _ablation_table(abl: dict | None) -> list[str]:
    if not abl:
        return []
    lines = [
        f"## Ablation: ecoserve on {abl['trace']}, {abl['profile']}, SLO `{abl['slo']}`",
        "",
        f"Mean JCT etc. at the common rate {_fmt(abl['common_rate'])} req/s (attainment under "
        f"`{abl['slo']}`).",
        "",
        "| variant | max rate @SLO90 (req/s) | mean JCT (s) | p99 TTFT (s) | SLO att. |"
        " preemptions |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, v in abl["variants"].items():
        cols = ("max_rate_at_slo90", "mean_jct_s", "p99_ttft_s", "slo_attainment", "preemptions")
        lines.append(f"| {name} | " + " | ".join(_fmt(v.get(k)) for k in cols) + " |")
    lines.append("")
    return lines
