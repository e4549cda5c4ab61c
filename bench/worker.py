"""Worker benchmark: our paged-KV runner against plain transformers, plus the ZeroMQ round trip.

    python bench/worker.py --out results/worker [--model NAME|GGUF|DIR] [--device cpu] [--quick]
    python bench/worker.py --out results/worker-smollm2 --model smollm2-135m-instruct \
        --batches 1 8 32 --decode-runs 3

Same model, device and dtype (fp32) for both sides. Without --model the tiny random-weight Llama
(`ecoserve_worker.tiny_model`) is built into a temp dir; a registered name or a .gguf is
converted first if it is not yet (`ecoserve_worker.models.ensure_model`). summary.json names
the model (`model.name`, its directory and shape).

* decode tok/s at batch B (1, 8, 32, 128): the B prompts (`--prompt-len` tokens each) are
  prefilled, then `--decode-steps` N decode steps of the whole batch are timed.
  - ecoserve: prefill in one `runner.step`, then N x (`runner.step` + greedy), timed end to end.
  - transformers: `generate(do_sample=False, min_new_tokens=k, max_new_tokens=k)`, static batch
    (left padding; the prompts are equal length so no pad is used). Decode time is
    t(k = N + 1) - t(k = 1), which takes the prefill and first token out; tokens = B x N.
  Each side: a warm-up, then the best of `decode_runs` rounds, the two sides interleaved.
* prefill tok/s: `--prefill-prompts` prompts of `--prefill-len` tokens in one `runner.step`
  against one plain forward of the same [prompts, len] batch (median of repeats after a warm-up).
* zmq_roundtrip_share_b32: a batch-32 decode plan (from a real SchedulerCore, vllm policy,
  requests with prompt_token_ids) is encoded and sent from a ROUTER over tcp on 127.0.0.1 to a
  real worker process started with `--echo` (no model, no sleep), which decodes it and answers
  with a StepResult that is decoded again; median round trip divided by our batch-32 decode
  step time. wire_codec_s_b32 is the in-process encode + decode of both messages.
* the start-up profiler's timings (timings.jsonl) and the token budget it measures.

Writes OUT/summary.json and OUT/timings.jsonl. The measurements live in worker_measure.py
(runner and transformers) and worker_wire.py (the ZeroMQ round trip); worker_step.py times one
step through the serving loop's own path (plan protobuf in, result frame out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for sub in ("services/worker", "services/scheduler"):
    p = str(REPO / sub)
    if p not in sys.path:
        sys.path.insert(0, p)
BENCH = str(Path(__file__).resolve().parent)
if BENCH not in sys.path:  # its sibling modules, also when loaded from a file path
    sys.path.insert(0, BENCH)

import torch  # noqa: E402
from worker_measure import (  # noqa: E402
    decode_step_mixed,
    ecoserve_decode,
    ecoserve_prefill,
    hf_decode,
    hf_prefill,
    mixed_contexts,
    prompts_for,
)
from worker_wire import decode_plan, zmq_roundtrip  # noqa: E402

from ecoserve_worker.model_runner import ModelRunner  # noqa: E402
from ecoserve_worker.profiling import profile_runner, token_budget, write_timings  # noqa: E402

BATCHES = (1, 8, 32, 128)


# ---- driver ------------------------------------------------------------------------------------


def _machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "loadavg_1m_at_end": os.getloadavg()[0],
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_bench(
    out: str | Path,
    model_dir: str | Path | None = None,
    *,
    device: str = "cpu",
    batches: tuple[int, ...] = BATCHES,
    prompt_len: int = 32,
    decode_steps: int = 32,
    prefill_prompts: int = 8,
    prefill_len: int = 128,
    repeats: int = 3,
    decode_runs: int = 5,
    warmup: bool = True,
    zmq_batch: int = 32,
    zmq_iters: int = 200,
    profile_shapes=None,
    profile_repeats: int = 3,
    log=print,
) -> dict[str, Any]:
    """Run every measurement; write OUT/summary.json and OUT/timings.jsonl; return the summary."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None
    name = "tiny"
    if model_dir is not None:
        from ecoserve_common.models import served_name
        from ecoserve_worker.models import ensure_model

        name = served_name(str(model_dir))
        model_dir = ensure_model(str(model_dir))
    else:
        from ecoserve_worker.tiny_model import build_tiny_model

        tmp = tempfile.TemporaryDirectory(prefix="ecoserve-tiny-")
        model_dir = Path(tmp.name) / "tiny"
        build_tiny_model(model_dir)
    try:
        block_size = 16
        per_seq = -(-(prompt_len + decode_steps + 1) // block_size)
        need = max(
            max(batches) * per_seq,
            prefill_prompts * -(-prefill_len // block_size),
            4608,  # the profiler's default grid (128 decodes at 512 context)
        )
        runner = ModelRunner(model_dir, device, torch.float32, need, block_size)
        cfg = runner.config
        vocab = int(cfg.vocab_size)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

        eco: dict[str, float] = {}
        tra: dict[str, float] = {}
        step_s: dict[int, float] = {}
        # Process-wide warm-up (thread pools, allocator, kernels) before anything is timed.
        warm = prompts_for(min(8, max(batches)), prompt_len, vocab, seed=0)
        for _ in range(2 if warmup else 0):
            ecoserve_decode(runner, warm, min(4, decode_steps))
            hf_decode(hf, warm, min(4, decode_steps), pad_id, device)
        for b in batches:
            prompts = prompts_for(b, prompt_len, vocab, seed=b)
            # Best of `decode_runs` rounds, the two sides interleaved so that both see the same
            # background load (this box may be shared); each round times the whole workload.
            if warmup:
                ecoserve_decode(runner, prompts, min(8, decode_steps))
            runs, hf_runs = [], []
            for _ in range(max(1, decode_runs)):
                runs.append(ecoserve_decode(runner, prompts, decode_steps))
                hf_runs.append(hf_decode(hf, prompts, decode_steps, pad_id, device, 1, warmup))
            r = max(runs, key=lambda x: x["tok_s"])
            eco[f"decode_tok_s_b{b}"] = r["tok_s"]
            step_s[b] = r["step_s"]
            tra[f"decode_tok_s_b{b}"] = max(hf_runs)
            log(
                f"decode b{b}: ecoserve {eco[f'decode_tok_s_b{b}']:.0f} tok/s, "
                f"transformers {tra[f'decode_tok_s_b{b}']:.0f} tok/s"
            )
        pre = prompts_for(prefill_prompts, prefill_len, vocab, seed=99)
        eco["prefill_tok_s"] = ecoserve_prefill(runner, pre, repeats)
        tra["prefill_tok_s"] = hf_prefill(hf, pre, repeats, device)
        log(
            f"prefill: ecoserve {eco['prefill_tok_s']:.0f}, transformers {tra['prefill_tok_s']:.0f}"
        )

        if zmq_batch in step_s:
            zstep = step_s[zmq_batch]
        else:
            zprompts = prompts_for(zmq_batch, prompt_len, vocab, seed=zmq_batch)
            zstep = ecoserve_decode(runner, zprompts, decode_steps)["step_s"]
        wire = zmq_roundtrip(decode_plan(zmq_batch, prompt_len, vocab), zmq_iters)
        rt = wire["roundtrip_s"]
        log(
            f"zmq round trip b{zmq_batch}: {rt * 1e6:.0f} us (codec {wire['codec_s'] * 1e6:.0f}"
            f" us) vs step {zstep * 1e3:.2f} ms"
        )

        t0 = time.perf_counter()
        rows = profile_runner(runner, profile_shapes, profile_repeats)
        write_timings(rows, out / "timings.jsonl")
        budget = token_budget(rows, fraction=0.9, step=16)
        profile_s = time.perf_counter() - t0
        log(f"profile: {len(rows)} shapes in {time.perf_counter() - t0:.1f}s, budget {budget}")

        summary: dict[str, Any] = {
            "ecoserve": eco,
            "transformers": tra,
            f"zmq_roundtrip_share_b{zmq_batch}": rt / zstep,
            f"zmq_roundtrip_s_b{zmq_batch}": rt,
            f"wire_codec_s_b{zmq_batch}": wire["codec_s"],
            f"decode_step_s_b{zmq_batch}": zstep,
            "machine": _machine(device),
            "model": {
                "name": name,
                "dir": None if tmp is not None else str(model_dir),
                "tiny": tmp is not None,
                "model_type": cfg.model_type,
                "vocab_size": vocab,
                "hidden_size": cfg.hidden_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "dtype": "float32",
                "params": sum(p.numel() for p in hf.parameters()),
            },
            "workload": {
                "batches": list(batches),
                "prompt_len": prompt_len,
                "decode_steps": decode_steps,
                "prefill_prompts": prefill_prompts,
                "prefill_len": prefill_len,
                "repeats": repeats,
                "decode_runs": decode_runs,
                "zmq_iters": zmq_iters,
            },
            "token_budget": budget,
            "profile_rows": len(rows),
            "profile_s": profile_s,
            "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        }
        if 32 in batches:
            summary["speedup_b32"] = eco["decode_tok_s_b32"] / tra["decode_tok_s_b32"]
        # Rows of one decode step at ShareGPT-like, unequal context lengths: grouped by length
        # (what runs) against one call padded to the longest row.
        contexts = mixed_contexts(32, seed=0)
        summary["decode_mixed_ctx_b32"] = {
            "contexts_mean": sum(contexts) / len(contexts),
            "contexts_max": max(contexts),
            "step_s_grouped": decode_step_mixed(runner, contexts, repeats * 5, padded=False),
            "step_s_padded": decode_step_mixed(runner, contexts, repeats * 5, padded=True),
        }
        log(f"mixed-context decode b32: {summary['decode_mixed_ctx_b32']}")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return summary
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/worker")
    ap.add_argument(
        "--model",
        default=None,
        help="registered name, .gguf or HF model dir (default: build the tiny model)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--prefill-prompts", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="decode batches")
    ap.add_argument("--decode-runs", type=int, default=5, help="rounds per decode batch (best)")
    ap.add_argument("--quick", action="store_true", help="few steps, for a smoke run")
    a = ap.parse_args(argv)
    steps = 4 if a.quick else a.decode_steps
    summary = run_bench(
        a.out,
        a.model,
        device=a.device,
        batches=tuple(a.batches),
        decode_runs=a.decode_runs,
        prompt_len=a.prompt_len,
        decode_steps=steps,
        prefill_prompts=a.prefill_prompts,
        prefill_len=a.prefill_len,
        repeats=a.repeats,
        zmq_iters=50 if a.quick else 200,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
