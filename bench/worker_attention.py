"""Decode attention of the worker: the C++ paged-decode kernel against the torch path.

    python bench/worker_attention.py [--repeats 40] [--steps 10] [--out results/worker-attention]

Per call: one layer of SmolLM2-135M's shape (9 query heads, 3 KV heads, D 64, block 16) as the
runner calls it (`PagedAttention.__call__`: the new K/V written, then the decode rows attend),
1 torch thread, bf16 and fp32, over a pool of 3000 blocks whose tables are scattered at random
(the pool does not sit in cache). Per step: `ModelRunner.step` on SmolLM2-135M (bf16, 1100
blocks) at batch 16 and 64, context 320, kernel on and off. Also the kernel's build time in a
fresh extension directory (first build, then a cached load). Medians; summary.json in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ecoserve_worker import kernels
from ecoserve_worker.attention import PagedAttention
from ecoserve_worker.cpuinfo import cpu_flags, cpu_model
from ecoserve_worker.model_runner import ModelRunner, inputs_from_rows

HEADS, KV_HEADS, HEAD_DIM, BLOCK, POOL = 9, 3, 64, 16, 3000
CASES = [(1, 320), (16, 320), (64, 144), (64, 320), (64, 640)]


def medians_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, called in turn (so drifts of a shared host's
    speed hit every variant alike)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {f"{k}_ms": round(statistics.median(v[1:]) * 1e3, 4) for k, v in samples.items()}


def scattered_rows(rows: int, ctx: int, num_blocks: int, rng: random.Random) -> list:
    """Decode rows at position `ctx`: random blocks, the one each row writes its own."""
    width = ctx // BLOCK + 1
    blocks = rng.sample(range(num_blocks), num_blocks)
    last, rest = blocks[:rows], blocks[rows:]
    out = []
    for i in range(rows):
        table = rng.sample(rest, width - 1) if rows * width > num_blocks else rest[: width - 1]
        if rows * width <= num_blocks:
            rest = rest[width - 1 :]
        out.append((f"r{i}", [5], ctx, [*table, last[i]]))
    return out


def per_call(dtype: torch.dtype, repeats: int, rng: random.Random) -> list[dict]:
    cpu = torch.device("cpu")
    attn = PagedAttention([None], POOL, BLOCK, HEADS, KV_HEADS, HEAD_DIM, dtype, cpu)
    attn.kv_cache[0].normal_()
    op, out = attn.kernel, []
    for rows, ctx in CASES:
        seqs = scattered_rows(rows, ctx, POOL, rng)
        q = torch.randn(rows, HEADS, HEAD_DIM).to(dtype)
        new_kv = torch.randn(rows, 2, KV_HEADS, HEAD_DIM).to(dtype)
        res: dict = {"dtype": str(dtype).removeprefix("torch."), "rows": rows, "context": ctx}
        fns = {}
        for name, kernel in (("kernel", op), ("torch", None)):
            if name == "torch" or op is not None:
                attn.kernel = kernel  # decides how the batch's decode rows are laid out
                batch = attn.batch(inputs_from_rows(seqs))
                fns[name] = lambda b=batch, q=q, kv=new_kv: attn(0, q, kv, 0.125, b)
        attn.kernel = op
        res |= medians_ms(fns, repeats)
        if op is not None:
            res["speedup"] = round(res["torch_ms"] / res["kernel_ms"], 2)
        print(json.dumps(res), flush=True)
        out.append(res)
    return out


def per_step(steps: int, batches: list[int], ctx: int, rng: random.Random) -> list[dict]:
    from ecoserve_common.models import resolve

    runner = ModelRunner(resolve("smollm2-135m-instruct"), dtype=torch.bfloat16, num_blocks=1100)
    for cache in runner.kv_cache:
        cache.normal_()
    op, out = runner.attention.kernel, []

    def step(seqs, kernel) -> None:
        runner.attention.kernel = kernel
        runner.step(seqs)

    for b in batches:
        seqs = scattered_rows(b, ctx, runner.num_blocks, rng)
        res: dict = {"model": "smollm2-135m-instruct", "dtype": "bfloat16", "rows": b}
        res["context"] = ctx
        fns = {"torch": lambda s=seqs: step(s, None)}
        if op is not None:
            fns = {"kernel": lambda s=seqs: step(s, op), **fns}
        res |= medians_ms(fns, steps)
        if op is not None:
            res["speedup"] = round(res["torch_ms"] / res["kernel_ms"], 2)
        print(json.dumps(res), flush=True)
        out.append(res)
    runner.attention.kernel = op
    return out


def build_times() -> dict:
    """Seconds of kernels.paged_decode() in a new process: in an empty extension directory
    (the first build), then again there (a cached load)."""
    code = (
        "import time; from ecoserve_worker import kernels; t = time.perf_counter(); "
        "ok = kernels.paged_decode() is not None; print(ok, time.perf_counter() - t)"
    )
    out = {}
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": d, "ECOSERVE_KERNELS": "1"}
        for key in ("first_build_s", "cached_load_s"):
            cmd = [sys.executable, "-c", code]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            ok, secs = r.stdout.split()[-2:] if r.stdout.strip() else ("False", "nan")
            out[key] = round(float(secs), 2) if ok == "True" else None
    return out


def machine() -> dict:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return {
        "cpu": cpu_model(),
        "isa": [x for x in wanted if x in cpu_flags()],
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "kernel": kernels.paged_decode() is not None,
        "kernel_tag": kernels.cpu_tag(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=40, help="timed calls per case (median)")
    ap.add_argument("--steps", type=int, default=10, help="timed runner steps per case")
    ap.add_argument("--step-batches", default="16,64")
    ap.add_argument("--no-build", action="store_true", help="skip the build-time measurement")
    ap.add_argument("--out", type=Path, default=Path("results/worker-attention"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    summary = {"machine": machine(), "command": " ".join(["python", *sys.argv])}
    if not a.no_build:
        summary["build"] = build_times()
        print(json.dumps(summary["build"]), flush=True)
    with torch.inference_mode():
        calls = [r for dt in (torch.bfloat16, torch.float32) for r in per_call(dt, a.repeats, rng)]
        summary["per_call_one_layer"] = calls
        batches = [int(x) for x in a.step_batches.split(",") if x]
        summary["per_step_smollm2"] = per_step(a.steps, batches, 320, rng) if batches else []
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
