"""`ecoserve` command line: simulated policy comparisons, capacity plans, cost-model profiles."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from .core import POLICIES
from .sim.cost_model import fit_profile, list_profiles, load_profile, load_timings, save_profile
from .sim.links import LINKS
from .sim.sweep import Scenario, max_rate_at_slo, run, workload

COLUMNS = [
    ("policy", None),
    ("rate", None),
    ("SLO att.", "slo_attainment"),
    ("goodput r/s", "goodput_rps"),
    ("tput r/s", "throughput_rps"),
    ("out tok/s", "output_tok_s"),
    ("mean JCT s", "mean_jct_s"),
    ("p99 JCT s", "p99_jct_s"),
    ("p99 TTFT s", "p99_ttft_s"),
    ("KV resv", "kv_reserved_share"),
    ("KV used", "kv_written_share"),
    ("preempt", "preemptions"),
    ("sched p99 us", "sched_us_per_iter_p99"),
]


def _scenario(a: argparse.Namespace) -> Scenario:
    return Scenario(
        trace=a.trace,
        n=a.n,
        seed=a.seed,
        profile=a.profile,
        rl_model=a.rl_model,
        slo_k=a.slo_k,
        data_dir=a.data_dir,
        num_workers=a.workers,
    )


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def cmd_compare(a: argparse.Namespace) -> int:
    # Wide enough for the table even when piped (rich assumes 80 columns then).
    console = Console(width=max(150, Console().width))
    sc = _scenario(a)
    policies = a.policies.split(",")
    for p in policies:
        if p not in POLICIES:
            console.print(f"[red]unknown policy {p!r}; known: {', '.join(POLICIES)}")
            return 2
    _, source = workload(sc, a.rates[0])
    lengths = source.rsplit("; ", 1)[0]  # the tail names the arrival rate of the first run
    console.print(f"workload: {lengths}; {sc.arrival} arrivals; {sc.n} requests per run")
    console.print(f"cost model: {sc.profile}")
    console.print(f"SLO: JCT <= {sc.slo_k} x unloaded JCT on the profile; RL model: {sc.rl_model}")
    table = Table(*[c for c, _ in COLUMNS])
    results: dict = {"workload": source, "scenario": sc.__dict__, "runs": []}
    for rate in a.rates:
        for p in policies:
            m = run(sc, p, rate)
            table.add_row(p, _fmt(rate), *[_fmt(getattr(m, k)) for _, k in COLUMNS[2:]])
            results["runs"].append({"policy": p, "rate": rate, **m.as_dict()})
    console.print(table)
    if a.max_rate:
        best = Table("policy", "max rate at SLO90 (req/s)")
        for p in policies:
            rate, _ = max_rate_at_slo(sc, p)
            best.add_row(p, f"{rate:.2f}")
            results.setdefault("max_rate_at_slo90", {})[p] = rate
        console.print(best)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from .sim import planner

    console = Console(width=max(120, Console().width))
    systems = a.systems.split(",")
    unknown = [s for s in systems if s not in planner.SYSTEMS]
    if unknown:
        console.print(f"[red]unknown systems {unknown}; known: {', '.join(planner.SYSTEMS)}")
        return 2
    plan = planner.Plan(
        trace=a.trace,
        n=a.n,
        duration_s=a.duration,
        seed=a.seed,
        profile=a.profile,
        data_dir=a.data_dir,
        slo=a.slo,
        slo_k=a.slo_k,
        ttft_s=a.ttft,
        tpot_s=a.tpot,
        target=a.target,
        max_gpus=a.max_gpus,
        link=a.link,
    )
    _, source = planner.records_at(plan, a.rates[0])
    console.print(f"workload: {source.rsplit('; ', 1)[0]}")
    console.print(
        f"profile: {plan.profile} (one instance = one GPU); SLO: {plan.slo_text()}, "
        f">= {plan.target:.0%} of requests; requests per run: "
        + ", ".join(f"{plan.requests_at(r)} at {r:g}" for r in a.rates)
    )
    results = {s: planner.plan_rates(plan, s, a.rates) for s in systems}
    table = Table("rate (req/s)", *[f"{s} GPUs" for s in systems])
    if "ecoserve" in systems and "distserve" in systems:
        table.add_column("ecoserve / distserve")
    for rate in sorted(a.rates):
        row = [f"{rate:g}"]
        for s in systems:
            ans = results[s][rate]
            cell = "> max" if ans.gpus is None else str(ans.gpus)
            if ans.split:
                cell += f" ({ans.split})"
            row.append(cell)
        if "ecoserve" in systems and "distserve" in systems:
            r = planner.ratio(results["ecoserve"][rate].gpus, results["distserve"][rate].gpus)
            row.append("-" if r is None else f"{r:.2f}")
        table.add_row(*row)
    console.print(table)
    console.print("distserve (p:d) = prefill:decode GPUs; link " + plan.link)
    if a.plot:
        planner.plot(results, f"{plan.trace}; {plan.slo_text()}; {plan.profile}", a.plot)
        console.print(f"wrote {a.plot}")
    if a.json:
        out = {
            "plan": {k: v for k, v in plan.__dict__.items() if k != "sim"},
            "slo": plan.slo_text(),
            "workload": source,
            "systems": {
                s: {f"{r:g}": ans.as_dict() for r, ans in results[s].items()} for s in systems
            },
        }
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
        console.print(f"wrote {a.json}")
    return 0


def cmd_profiles(a: argparse.Namespace) -> int:
    for name in list_profiles():
        p = load_profile(name)
        print(f"{name}: {p.num_blocks()} blocks of {p.block_size} tokens")
    return 0


def cmd_fit(a: argparse.Namespace) -> int:
    fitted = fit_profile(load_profile(a.base), load_timings(a.timings))
    save_profile(fitted, a.out)
    print(f"wrote {a.out}")
    return 0


def cmd_export_pairs(a: argparse.Namespace) -> int:
    """What `ecoserve-predictor retrain --pairs` reads: one finished request per line."""
    from .store import RequestStore, make_engine

    rows = RequestStore(make_engine(a.db)).finished_pairs(limit=a.limit, model_id=a.model_id)
    with open(a.out, "w") as f:
        for prompt, tokens in rows:
            f.write(json.dumps({"prompt": prompt, "response_tokens": tokens}) + "\n")
    print(f"{len(rows)} served requests -> {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ecoserve", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="simulate policies on a trace and print a table")
    c.add_argument(
        "--trace",
        default="sharegpt",
        help="sharegpt | sharegpt_long | sharegpt_multiturn | azure_conv | alpaca | synthetic",
    )
    c.add_argument(
        "--policies",
        default="ecoserve,vllm",
        help="comma-separated: ecoserve, vllm, vllm-v0, sarathi, orca, sjf",
    )
    c.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="req/s")
    c.add_argument("--n", type=int, default=1000, help="requests per run")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--profile",
        default="llama-2-7b_a100-80gb",
        help="llama-2-{7b,13b}_{a100-80gb,a100-40gb,h100-80gb}",
    )
    c.add_argument("--rl-model", default="noisy", help="oracle | noisy | alpaca")
    c.add_argument("--slo-k", type=float, default=5.0, help="JCT SLO = k x unloaded JCT")
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--data-dir", default=None, help="default: $ECOSERVE_DATA_DIR or ../shared/data")
    c.add_argument("--max-rate", action="store_true", help="also search max rate at 90%% SLO")
    c.add_argument("--json", default=None, help="write results to this file")
    c.set_defaults(fn=cmd_compare)
    pl = sub.add_parser("plan", help="fewest GPUs per system for a trace, SLO and target rate")
    pl.add_argument(
        "--trace", default="sharegpt", help="sharegpt | azure_conv | synthetic | a CSV/JSONL file"
    )
    pl.add_argument("--rates", type=float, nargs="+", default=[2.0, 5.0, 10.0, 20.0])
    pl.add_argument("--systems", default="ecoserve,distserve,vllm")
    pl.add_argument("--slo", choices=("jct", "ttft-tpot"), default="jct")
    pl.add_argument("--slo-k", type=float, default=5.0, help="jct: JCT <= k x unloaded JCT")
    pl.add_argument("--ttft", type=float, default=1.0, help="ttft-tpot: TTFT bound (s)")
    pl.add_argument("--tpot", type=float, default=0.1, help="ttft-tpot: TPOT bound (s)")
    pl.add_argument("--target", type=float, default=0.9, help="SLO attainment to reach")
    pl.add_argument("--max-gpus", type=int, default=32)
    pl.add_argument("--link", default="nvlink-a100", help=f"distserve KV link: {', '.join(LINKS)}")
    pl.add_argument("--profile", default="llama-2-7b_a100-80gb")
    pl.add_argument("--n", type=int, default=400, help="requests per run (at least)")
    pl.add_argument(
        "--duration", type=float, default=120.0, help="arrival window (s): n >= rate x this"
    )
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument(
        "--data-dir", default=None, help="default: $ECOSERVE_DATA_DIR or ../shared/data"
    )
    pl.add_argument("--plot", default=None, help="write GPUs vs rate here (PNG)")
    pl.add_argument("--json", default=None, help="write the answers here")
    pl.set_defaults(fn=cmd_plan)
    p = sub.add_parser("profiles", help="list shipped cost-model profiles")
    p.set_defaults(fn=cmd_profiles)
    f = sub.add_parser("fit-profile", help="fit a cost-model profile from measured step timings")
    f.add_argument("--base", default="llama-2-7b_a100-80gb")
    f.add_argument("--timings", required=True, help="JSONL/CSV of step timings")
    f.add_argument("--out", required=True)
    f.set_defaults(fn=cmd_fit)
    e = sub.add_parser("export-pairs", help="served (prompt, response tokens) as JSONL")
    e.add_argument("--db", required=True, help="SQLAlchemy URL of the request store")
    e.add_argument("--out", required=True, help="JSONL file to write")
    e.add_argument("--model-id", default=None, help="only requests served by this model")
    e.add_argument("--limit", type=int, default=None, help="newest N finished requests")
    e.set_defaults(fn=cmd_export_pairs)
    sub.add_parser("serve", help="run the scheduler service (ecoserve serve --help)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the live scheduler has its own typed settings
        from .live.serve import main as serve_main

        return serve_main(argv[1:])
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
