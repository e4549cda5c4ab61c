"""Live-stack benchmark: a ShareGPT slice replayed against the embedded stack (predictor,
scheduler, 2 CPU workers, `--model`: SmolLM2-135M-Instruct by default, `tiny` for the random
test model) at a sweep of Poisson rates, per policy.

    python bench/live.py --out results/live [--policies ecoserve vllm] [--rates 2 4 8 16]

For each policy: one stack; for each rate, `--n` requests (real prompts, real response lengths
capped at `--max-output`, EOS ignored), measured by the client: throughput, goodput (requests
meeting the TTFT and TPOT SLO per second), TTFT/TPOT/JCT percentiles, SLO attainment; from the
scheduler's Stats: mean KV blocks in use (sampled every 0.25 s) and the scheduler's own time
per iteration (core.schedule + core.update) as a share of the workers' step time.
`max_rate_at_slo90` is the highest swept rate with attainment >= 0.9. Writes OUT/summary.json.

`--workload two-class` (what `make bench-live` runs second, into results/live-slo): the same
replay with each request asking for a latency SLO class (live/slo.py), a `--interactive-share`
of them (seeded, shuffled) `interactive` (tight TTFT) and the rest `batch` (loose), through the
SDK's `slo_class`. Reported per class and rate: attainment as the client measures it against
the class's targets (read from the scheduler's Stats), the scheduler's own count of the same
(its per-class SLO ledger, what /metrics exports), and TTFT/TPOT percentiles; `slo_attainment`
is then the share of all requests that met their own class's SLO.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for sub in ("services/scheduler", "services/worker", "services/predictor", "sdk"):
    sys.path.insert(0, str(REPO / sub))

from ecoserve_client import Client  # noqa: E402
from ecoserve_common.models import DEFAULT_MODEL  # noqa: E402
from ecoserve_stack.demo import build_parser, replay, summarize, workload  # noqa: E402
from ecoserve_stack.launcher import free_port, start_stack, stop_all  # noqa: E402


def sample_kv(address: str, stop: threading.Event, out: list[float]) -> None:
    with Client(address, timeout_s=5) as c:
        while not stop.is_set():
            kv = c.stats().get("kv", {})
            total = sum(v["num_blocks"] for v in kv.values())
            if total:
                out.append(sum(v["blocks_used"] for v in kv.values()) / total)
            stop.wait(0.25)


def assign_classes(n: int, classes: list[str], share: float, seed: int) -> list[str]:
    """`n` class names: round(share * n) of the first class, the rest of the second, shuffled
    with `seed` (the same mix at every rate and for every policy)."""
    first = round(share * n)
    names = [classes[0]] * first + [classes[1]] * (n - first)
    random.Random(seed).shuffle(names)
    return names


def met_class(r: dict, targets: dict) -> bool:
    """A client-side result met its class's targets (seconds: ttft_s, tpot_s, deadline_s)."""
    if not r.get("ok"):
        return False
    return (
        r["ttft_s"] <= targets.get("ttft_s", math.inf)
        and (r["tokens"] < 2 or r["tpot_s"] <= targets.get("tpot_s", math.inf))
        and r["jct_s"] <= targets.get("deadline_s", math.inf)
    )


def per_class(results: list[dict], before: dict, after: dict) -> dict:
    """Per SLO class: requests, client-side attainment against the class's targets, the
    scheduler's own count over the same span (its SLO ledger: after - before), TTFT/TPOT."""
    out = {}
    classes = after.get("classes", {})
    for name in sorted({r["slo_class"] for r in results}):
        mine = [r for r in results if r["slo_class"] == name]
        ok = [r for r in mine if r.get("ok")]
        targets = classes.get(name, {}).get("targets", {})
        seen = {
            k: classes.get(name, {}).get(k, 0) - before.get("classes", {}).get(name, {}).get(k, 0)
            for k in ("requests", "met", "missed_ttft", "missed_tpot", "missed_failed")
        }

        def pct(key: str, q: float, ok=ok) -> float:
            xs = sorted(r[key] for r in ok)
            return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

        out[name] = {
            "targets": targets,
            "requests": len(mine),
            "completed": len(ok),
            "slo_attainment": sum(met_class(r, targets) for r in mine) / len(mine),
            "server_slo_attainment": seen["met"] / seen["requests"] if seen["requests"] else None,
            "server_counts": seen,
            "ttft_p50_s": pct("ttft_s", 0.5),
            "ttft_p99_s": pct("ttft_s", 0.99),
            "tpot_p50_s": pct("tpot_s", 0.5),
            "tpot_p99_s": pct("tpot_s", 0.99),
        }
    return out


def run_policy(policy: str, rates: list[float], a) -> dict:
    args = build_parser().parse_args(
        [
            "--policy",
            policy,
            "--workers",
            str(a.workers),
            "--n",
            str(a.n),
            "--home",
            a.home,
            "--max-output",
            str(a.max_output),
            "--num-blocks",
            str(a.num_blocks),
            "--model",
            a.model,
            "--token-budget",
            str(a.token_budget),
        ]
        + (["--data-dir", a.data_dir] if a.data_dir else [])
    )
    args.grpc_port, args.http_port = free_port(), free_port()
    name, items = workload(args)
    stack = start_stack(args)
    out: dict = {"rates": {}, "workload": name}
    two_class = a.workload == "two-class"
    names = assign_classes(len(items), a.classes, a.interactive_share, args.seed)
    try:
        for rate in rates:
            with Client(stack.grpc_address) as c:
                stats = c.stats()
            before, slo_before = stats["engine"], stats.get("slo", {})
            kv: list[float] = []
            stop = threading.Event()
            sampler = threading.Thread(target=sample_kv, args=(stack.grpc_address, stop, kv))
            sampler.start()
            t0 = time.perf_counter()
            if two_class:
                results = replay(stack.grpc_address, items, rate, args.seed, slo_classes=names)
            else:
                results = replay(stack.grpc_address, items, rate, args.seed)
            elapsed = time.perf_counter() - t0
            stop.set()
            sampler.join()
            time.sleep(0.1)  # one stats refresh (50 ms) after the last result
            with Client(stack.grpc_address) as c:
                stats = c.stats()
            after, slo_after = stats["engine"], stats.get("slo", {})
            m = summarize(results, elapsed, args)
            if two_class:  # each request judged by its own class's targets
                m["classes"] = per_class(results, slo_before, slo_after)
                targets = {k: v["targets"] for k, v in m["classes"].items()}
                met = sum(met_class(r, targets[r["slo_class"]]) for r in results)
                m["slo_attainment"] = met / len(results) if results else 0.0
                m["slo"] = targets
            steps = after["steps"] - before["steps"]
            fwd = after["forward_s"] - before["forward_s"]
            core = after["core_s"] - before["core_s"]
            m["goodput_req_s"] = m["slo_attainment"] * m["requests"] / elapsed
            m["kv_used_share_mean"] = sum(kv) / len(kv) if kv else 0.0
            m["iterations"] = steps
            m["scheduler_s_per_iter"] = core / steps if steps else 0.0
            m["scheduler_share_of_step"] = core / fwd if fwd else 0.0
            out["rates"][f"{rate:g}"] = m
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
            shown.pop("slo", None)
            classes = shown.pop("classes", {})
            print(f"{policy} @ {rate:g} req/s: {json.dumps(shown)}")
            for cls, row in classes.items():
                print(
                    f"  {cls}: attainment {row['slo_attainment']:.3f} (server "
                    f"{row['server_slo_attainment']}), TTFT p50 {row['ttft_p50_s']:.3f} s p99 "
                    f"{row['ttft_p99_s']:.3f} s, TPOT p50 {row['tpot_p50_s']:.3f} s, "
                    f"targets {row['targets']}"
                )
    finally:
        stop_all(stack.procs)
    ok = [r for r in rates if out["rates"][f"{r:g}"]["slo_attainment"] >= 0.9]
    out["max_rate_at_slo90"] = max(ok) if ok else 0.0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/live")
    ap.add_argument("--policies", nargs="+", default=["ecoserve", "vllm"])
    ap.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--num-blocks", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--home", default=".ecoserve")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="name, .gguf, directory or `tiny`")
    ap.add_argument(
        "--token-budget", type=int, default=512, help="workers skip start-up profiling (slow)"
    )
    ap.add_argument(
        "--workload",
        choices=["single", "two-class"],
        default="single",
        help="single: no SLO asked (the server's default class), judged by TTFT/TPOT bounds; "
        "two-class: each request asks for one of --classes (module docstring)",
    )
    ap.add_argument(
        "--classes",
        nargs=2,
        default=["interactive", "batch"],
        help="two-class: the tight and the loose SLO class (the scheduler's slo_classes)",
    )
    ap.add_argument(
        "--interactive-share", type=float, default=0.5, help="two-class: share of the first"
    )
    a = ap.parse_args(argv)
    policies = {p: run_policy(p, a.rates, a) for p in a.policies}
    defaults = build_parser().parse_args([])
    summary = {
        "policies": {
            p: {k: v for k, v in r.items() if k != "workload"} for p, r in policies.items()
        },
        "slo": (
            {"ttft_s": defaults.ttft_slo_s, "tpot_s": defaults.tpot_slo_s}
            if a.workload == "single"
            else {
                "classes": a.classes,
                "interactive_share": a.interactive_share,
                "definition": "each request asks for its class (slo_class) and is judged by "
                "that class's targets (the scheduler's Stats): TTFT, TPOT (more than one "
                "token), deadline; client-side, and the scheduler's own count alongside",
            }
        ),
        "setup": {
            "workers": a.workers,
            "model": f"{a.model}, CPU, worker default dtype (float32), token budget "
            f"{a.token_budget}",
            "kv_blocks_per_worker": a.num_blocks,
            "block_size": 16,
            "requests_per_rate": a.n,
            "max_output_tokens": a.max_output,
            "workload": next(iter(policies.values()))["workload"],
            "slo_workload": a.workload,
            "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}",
        },
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
