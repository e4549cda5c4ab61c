"""The ceiling on bench-sim's max rates: what each policy serves when every request is already
waiting (a saturating arrival rate), per trace x profile, set beside the max rates at 90% SLO
that `make bench-sim` found (its summary.json).

A policy's saturated request throughput is the most it can serve at all; no SLO can hold 90%
at a rate above it for long. So where the vLLM baseline's max rate at SLO90 already sits near
the highest saturated throughput of any policy, no policy on the same cost model can be 1.3x
the baseline there, and the ratio `goal / ceiling` (1.3 x vLLM's max rate over the best
capacity) says by how much the goal lies beyond it.

    python bench/sim_capacity.py [--sim results/sim] [--out results/sim/capacity.json]

Reads the trace x profile grid and the data directory from the bench-sim summary; writes the
JSON and a markdown table beside it (capacity.md). Deterministic (the simulator is).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ecoserve_scheduler.sim.sweep import Scenario, run

REPO = Path(__file__).resolve().parent.parent
SATURATING = 1000.0  # req/s: the whole trace arrives within about a second
POLICIES = ("vllm", "vllm-v0", "ecoserve")
GOALS = {"vllm": 1.3, "vllm-v0": 3.0}  # issue 19: ecoserve's max rate over each baseline's


def capacity(scenario: Scenario, policies=POLICIES) -> dict[str, dict]:
    """Each policy's throughput with every request waiting from the start."""
    out = {}
    for policy in policies:
        m = run(scenario, policy, SATURATING)
        out[policy] = {
            "throughput_rps": round(m.throughput_rps, 3),
            "output_tok_s": round(m.output_tok_s, 1),
            "preemptions": m.preemptions,
        }
    return out


def ceiling_rows(summary: dict, caps: dict) -> list[dict]:
    """Per trace x profile x SLO definition: the max rates at SLO90 beside the best capacity,
    and how far each goal of issue 19 is above it."""
    rows = []
    for trace, profiles in summary["traces"].items():
        for profile, cell in profiles.items():
            cap = caps.get(trace, {}).get(profile)
            if not cap:
                continue
            best = max(c["throughput_rps"] for c in cap.values())
            for slo, runs in cell.items():
                if slo.startswith("_"):
                    continue
                rate = {p: runs[p]["max_rate_at_slo90"] for p in POLICIES if p in runs}
                row = {"trace": trace, "profile": profile, "slo": slo, "capacity_rps": best}
                row["max_rate_at_slo90"] = rate
                for base, k in GOALS.items():
                    if rate.get(base):
                        row[f"goal_vs_{base}_over_capacity"] = round(k * rate[base] / best, 3)
                if rate.get("vllm"):
                    row["vllm_share_of_capacity"] = round(rate["vllm"] / best, 3)
                rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| trace | profile | SLO | best capacity req/s | vllm max rate | share | ecoserve max "
        "rate | 1.3x vllm / capacity | 3x vllm-v0 / capacity |\n|---|---|---|---:|---:|---:|"
        "---:|---:|---:|\n"
    )
    lines = [
        f"| {r['trace']} | {r['profile']} | {r['slo']} | {r['capacity_rps']:.2f} | "
        f"{r['max_rate_at_slo90'].get('vllm', 0):.2f} | {r.get('vllm_share_of_capacity', 0):.2f}"
        f" | {r['max_rate_at_slo90'].get('ecoserve', 0):.2f} | "
        f"{r.get('goal_vs_vllm_over_capacity', 0):.2f} | "
        f"{r.get('goal_vs_vllm-v0_over_capacity', 0):.2f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sim", default="results/sim", help="a bench-sim output folder")
    ap.add_argument("--out", default=None, help="default: SIM/capacity.json")
    ap.add_argument("--data-dir", default=None, help="default: $ECOSERVE_DATA_DIR, ../shared/data")
    ap.add_argument("--seed", type=int, default=0, help="bench-sim's --seed")
    a = ap.parse_args(argv)
    summary = json.loads((Path(a.sim) / "summary.json").read_text())
    data_dir = a.data_dir or os.environ.get("ECOSERVE_DATA_DIR")
    if data_dir is None and (REPO.parent / "shared" / "data").is_dir():
        data_dir = str(REPO.parent / "shared" / "data")
    caps: dict[str, dict] = {}
    for trace, profiles in summary["traces"].items():
        for profile in profiles:
            sc = Scenario(
                trace=trace, n=summary["n_requests"], seed=a.seed, profile=profile,
                rl_model=summary["rl_model"], data_dir=data_dir,
            )  # fmt: skip
            caps.setdefault(trace, {})[profile] = capacity(sc)
            print(trace, profile, json.dumps(caps[trace][profile]), file=sys.stderr, flush=True)
    rows = ceiling_rows(summary, caps)
    out = Path(a.out or Path(a.sim) / "capacity.json")
    note = f"{len(POLICIES)} policies at {SATURATING:g} req/s, n and seed of the bench-sim run"
    out.write_text(json.dumps({"method": note, "capacity": caps, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
