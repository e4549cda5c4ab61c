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
"""

from __future__ import annotations

import argparse
import json
import platform
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
    try:
        for rate in rates:
            with Client(stack.grpc_address) as c:
                before = c.stats()["engine"]
            kv: list[float] = []
            stop = threading.Event()
            sampler = threading.Thread(target=sample_kv, args=(stack.grpc_address, stop, kv))
            sampler.start()
            t0 = time.perf_counter()
            results = replay(stack.grpc_address, items, rate, args.seed)
            elapsed = time.perf_counter() - t0
            stop.set()
            sampler.join()
            time.sleep(0.1)  # one stats refresh (50 ms) after the last result
            with Client(stack.grpc_address) as c:
                after = c.stats()["engine"]
            m = summarize(results, elapsed, args)
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
            print(f"{policy} @ {rate:g} req/s: {json.dumps(shown)}")
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
    a = ap.parse_args(argv)
    policies = {p: run_policy(p, a.rates, a) for p in a.policies}
    defaults = build_parser().parse_args([])
    summary = {
        "policies": {
            p: {k: v for k, v in r.items() if k != "workload"} for p, r in policies.items()
        },
        "slo": {"ttft_s": defaults.ttft_slo_s, "tpot_s": defaults.tpot_slo_s},
        "setup": {
            "workers": a.workers,
            "model": f"{a.model}, CPU, worker default dtype (float32), token budget "
            f"{a.token_budget}",
            "kv_blocks_per_worker": a.num_blocks,
            "block_size": 16,
            "requests_per_rate": a.n,
            "max_output_tokens": a.max_output,
            "workload": next(iter(policies.values()))["workload"],
            "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}",
        },
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
