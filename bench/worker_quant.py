"""Weight-only quantization on this CPU: would int8 or int4 weights make SmolLM2's projections
faster than the worker's bf16 oneDNN-prepacked ones?

    python bench/worker_quant.py [--out results/worker-quant]           # kernels
    python bench/worker_quant.py --whole-model [--parts speed batch quality]  # SmolLM2

torch's own weight-only CPU kernels (no extra package): `aten._weight_int8pack_mm` (int8
weights, per-output-channel scales, bf16 activations) and `aten._weight_int4pack_mm_for_cpu`
(int4 weights in groups of 32). Each is timed against `mkldnn._linear_pointwise` on a bf16
weight prepacked as the worker does, 1 thread, alternated, on SmolLM2's projection shapes
(fused qkv, o_proj, fused gate/up, down, lm_head) at 1, 16 and 64 rows; the summary also gives
the whole-step sum (30 layers + lm_head) and each kernel's largest error against fp32.
Random weights: speed does not depend on the values.

`--whole-model` (bench/worker_quant_model.py) measures the worker's `--quantization` on the real
model instead: decode tok/s at batch 1 and 16, the hybrid threshold, greedy agreement with the
unquantized model and perplexity; it goes into the summary's `whole_model` section (each part
run replaces its own entry, the kernel fields stay).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# SmolLM2-135M: hidden 576, 9 heads x 64 + 2 x 3 KV heads x 64 = 960 (qkv), MLP 1536, vocab 49152
SHAPES = {"qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
HEAD = ("lm_head", (49152, 576))
LAYERS = 30
ROWS = (1, 16, 64)
GROUP = 32


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def kernels(w: torch.Tensor, rows: int):
    """(name -> callable(x)) for one fp32 weight [out, in]."""
    packed = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows)
    scale = w.abs().amax(1) / 127
    w8 = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
    out = {
        "bf16_prepacked": lambda x: torch.ops.mkldnn._linear_pointwise(
            x, packed, None, "none", [], ""
        ),
        "int8_weight_only": lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, scale.bfloat16()),
    }
    try:  # int4: unsigned 4-bit values in groups, packed for the CPU kernel
        g = w.view(w.shape[0], -1, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        s4 = ((hi - lo) / 15).clamp(min=1e-8)
        q4 = torch.round((g - lo[..., None]) / s4[..., None]).clamp(0, 15).to(torch.int32)
        q4 = q4.view(w.shape[0], -1)
        packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
        sz = torch.stack([s4, lo + 8 * s4], -1).transpose(0, 1).contiguous().bfloat16()
        out["int4_weight_only"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed4, GROUP, sz
        )
        out["int4_weight_only"](torch.zeros(1, w.shape[1], dtype=torch.bfloat16))
    except (RuntimeError, AttributeError) as e:  # not in this torch build
        print(f"int4 unavailable: {e}", file=sys.stderr)
        out.pop("int4_weight_only", None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/worker-quant")
    ap.add_argument("--repeats", type=int, default=None, help="default 15 (kernels), 5 (model)")
    ap.add_argument("--whole-model", action="store_true", help="the real model, not kernels")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="with --whole-model")
    ap.add_argument("--parts", nargs="+", default=["speed", "batch", "quality"])
    ap.add_argument("--new", type=int, default=128, help="single-stream decode steps timed")
    ap.add_argument("--prompts", type=int, default=20, help="quality: prompts")
    ap.add_argument("--quality-new", type=int, default=64, help="quality: tokens per answer")
    a = ap.parse_args()
    out = Path(a.out)
    path = out / "summary.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    if a.whole_model:
        summary = {**old, "whole_model": {**old.get("whole_model", {})}}
        summary["whole_model"].update(whole_model(a, command))
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        return 0
    a.repeats = a.repeats or 15
    torch.set_num_threads(1)
    torch.manual_seed(0)
    per_shape: dict = {}
    step_ms: dict = {}
    errors: dict = {}
    for rows in ROWS:
        totals: dict[str, float] = {}
        for name, (n_out, n_in) in [*SHAPES.items(), HEAD]:
            w = torch.randn(n_out, n_in) * 0.02
            x = torch.randn(rows, n_in).bfloat16()
            ks = kernels(w, rows)
            ref = x.float() @ w.T
            times = {k: timed(lambda f=f, x=x: f(x), a.repeats) for k, f in ks.items()}
            count = 1 if name == "lm_head" else LAYERS
            for k, t in times.items():
                totals[k] = totals.get(k, 0.0) + count * t
                err = float((ks[k](x).float() - ref).abs().max() / ref.abs().max())
                errors[k] = max(errors.get(k, 0.0), err)
            per_shape[f"{name}_rows{rows}_us"] = {k: round(t * 1e6, 1) for k, t in times.items()}
        step_ms[f"rows_{rows}"] = {k: round(t * 1e3, 2) for k, t in totals.items()}
        print(f"rows {rows}: projections per step (ms) {step_ms[f'rows_{rows}']}", file=sys.stderr)
    summary = {
        **old,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": 1,
        },
        "command": command,
        "projections_per_step_ms": step_ms,
        "per_shape_us": per_shape,
        "max_relative_error_vs_fp32": {k: round(v, 4) for k, v in errors.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["projections_per_step_ms"], indent=2))
    return 0


def whole_model(a: argparse.Namespace, command: str) -> dict:
    """The `whole_model` entries of this run: machine, model, command, one entry per part."""
    from worker_quant_model import run

    from ecoserve_common.models import served_name
    from ecoserve_worker.cpuinfo import cpu_model
    from ecoserve_worker.models import ensure_model

    path = ensure_model(a.model)
    parts = run(path, a.parts, a.repeats or 5, a.new, a.prompts, a.quality_new)
    head = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__},
        "threads": 1,
        "dtype": "bfloat16",
        "model": {"name": served_name(a.model), "path": str(path)},
        f"command_{'_'.join(a.parts)}": command,
    }
    return {**head, **parts}


if __name__ == "__main__":
    raise SystemExit(main())
