"""Worker benchmark: our paged-KV runner against plain transformers, plus the ZeroMQ round trip.

    python bench/worker.py --out results/worker [--model DIR] [--device cpu] [--quick]

Same model, device and dtype (fp32) for both sides. Without --model the tiny random-weight Llama
(`ecoserve_worker.tiny_model`) is built into a temp dir.

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

Writes OUT/summary.json and OUT/timings.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
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

import torch  # noqa: E402

from ecoserve_worker.model_runner import ModelRunner, greedy  # noqa: E402
from ecoserve_worker.profiling import profile_runner, token_budget, write_timings  # noqa: E402

BATCHES = (1, 8, 32, 128)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip the first few ids (special tokens of the tiny tokenizer).
    return torch.randint(4, vocab, (batch, length), generator=g).tolist()


def _median_time(fn, repeats: int, device: str) -> float:
    fn()
    _sync(device)
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return float(statistics.median(samples))


# ---- ecoserve runner ---------------------------------------------------------------------------


def ecoserve_decode(runner: ModelRunner, prompts: list[list[int]], steps: int) -> dict[str, float]:
    """Prefill the batch in one step, then time `steps` decode steps; tok/s and step time."""
    bs = runner.block_size
    length = len(prompts[0])
    per_seq = -(-(length + steps + 1) // bs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    if len(prompts) * per_seq > runner.num_blocks:
        raise ValueError("runner pool too small for this batch")
    rids = [f"r{i}" for i in range(len(prompts))]
    seqs = [(rid, p, 0, t) for rid, p, t in zip(rids, prompts, tables, strict=True)]
    nxt = greedy(runner.step(seqs))
    _sync(runner.device)
    t0 = time.perf_counter()
    for s in range(steps):
        pos = length + s
        seqs = [(rid, [tok], pos, t) for rid, tok, t in zip(rids, nxt, tables, strict=True)]
        nxt = greedy(runner.step(seqs))
    _sync(runner.device)
    elapsed = time.perf_counter() - t0
    return {"tok_s": len(prompts) * steps / elapsed, "step_s": elapsed / steps}


def mixed_contexts(batch: int, seed: int, cap: int = 1280) -> list[int]:
    """Context lengths like a ShareGPT decode batch: lognormal, median ~200, a long tail."""
    rng = random.Random(seed)
    return [min(cap, max(1, int(rng.lognormvariate(5.3, 0.8)))) for _ in range(batch)]


def decode_step_mixed(runner: ModelRunner, contexts: list[int], repeats: int, padded: bool):
    """Median time of one decode step whose rows sit at different context lengths (what the
    pool holds does not change the cost). `padded` forces the single padded attention call
    (every row padded to the longest) that grouping by length replaced."""
    import ecoserve_worker.attention as mr

    bs, start, seqs = runner.block_size, 0, []
    for i, ctx in enumerate(contexts):
        n = ctx // bs + 1
        seqs.append((f"r{i}", [1], ctx, list(range(start, start + n))))
        start += n
    if start > runner.num_blocks:
        raise ValueError("runner pool too small for these contexts")
    saved = mr.GROUP_OVERHEAD_BLOCKS
    mr.GROUP_OVERHEAD_BLOCKS = 10**9 if padded else saved
    try:
        runner.step(seqs)
        return _median_time(lambda: runner.step(seqs), repeats, str(runner.device))
    finally:
        mr.GROUP_OVERHEAD_BLOCKS = saved


def ecoserve_prefill(runner: ModelRunner, prompts: list[list[int]], repeats: int) -> float:
    bs = runner.block_size
    per_seq = -(-len(prompts[0]) // bs)
    seqs = [
        (f"p{i}", p, 0, list(range(i * per_seq, (i + 1) * per_seq))) for i, p in enumerate(prompts)
    ]
    t = _median_time(lambda: runner.step(seqs), repeats, str(runner.device))
    return sum(len(p) for p in prompts) / t


# ---- plain transformers ------------------------------------------------------------------------


def hf_decode(
    model,
    prompts: list[list[int]],
    steps: int,
    pad_id: int,
    device: str,
    runs: int = 1,
    warmup: bool = True,
) -> float:
    ids = torch.tensor(prompts, dtype=torch.long, device=device)  # equal length: no padding
    mask = torch.ones_like(ids)

    def gen(k: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                min_new_tokens=k,
                max_new_tokens=k,
                pad_token_id=pad_id,
            )
        _sync(device)
        return time.perf_counter() - t0

    if warmup:
        gen(min(8, steps) + 1)
    t_full = min(gen(steps + 1) for _ in range(max(1, runs)))
    t_first = min(gen(1) for _ in range(2))
    return len(prompts) * steps / max(t_full - t_first, 1e-9)


def hf_prefill(model, prompts: list[list[int]], repeats: int, device: str) -> float:
    ids = torch.tensor(prompts, dtype=torch.long, device=device)

    def fwd():
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    return ids.numel() / _median_time(fwd, repeats, device)


# ---- ZeroMQ round trip -------------------------------------------------------------------------


def decode_plan(batch: int, prompt_len: int, vocab: int):
    """A real batch-`batch` decode plan from a SchedulerCore (vllm policy)."""
    from ecoserve_scheduler.core import (
        Request,
        SamplingParams,
        SchedulerCore,
        StepResult,
        WorkerSpec,
        make_policy,
    )

    core = SchedulerCore(make_policy("vllm"))
    core.add_worker(
        WorkerSpec("w0", num_blocks=4096, block_size=16, token_budget=4096, max_num_seqs=256)
    )
    for i, p in enumerate(_prompts(batch, prompt_len, vocab, seed=7)):
        sp = SamplingParams(max_tokens=64)
        core.add(Request(f"r{i}", prompt_len, 0.0, sp, prompt_token_ids=tuple(p)), 0.0)
    for t in range(32):
        plan = core.schedule("w0", float(t)).plan
        if plan is None:
            break
        if len(plan.decodes) == batch and not plan.prefills:
            return plan
        core.update(StepResult(plan.step_id, "w0", [5] * len(plan.sampled_ids())), t + 0.5)
    raise RuntimeError(f"scheduler produced no batch-{batch} decode plan")


def zmq_roundtrip(plan, iters: int) -> dict[str, float]:
    """Median seconds from sending `plan` to holding its decoded StepResult, through a real
    worker process (`ecoserve-worker --echo`: the whole receive -> decode -> execute -> encode
    -> send loop with nothing inside), over tcp on 127.0.0.1 from a ROUTER as the scheduler
    has. Also the in-process codec share: encode + decode of the plan and of the result."""
    import subprocess

    import zmq

    from ecoserve_common.pb import worker_pb2 as pb
    from ecoserve_common.wire import (
        decode,
        encode,
        plan_from_proto,
        plan_to_proto,
        result_from_proto,
        result_to_proto,
    )
    from ecoserve_scheduler.core import StepResult

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    addr = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "services/worker"), str(REPO / "services/scheduler"), env.get("PYTHONPATH", "")]
    )
    cmd = [sys.executable, "-m", "ecoserve_worker", "--scheduler", addr, "--worker-id", "echo"]
    cmd += ["--echo", "--heartbeat-s", "3600", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env=env)

    def recv(body_wanted: str) -> pb.Envelope:
        while True:
            if not router.poll(30_000):
                raise RuntimeError("echo worker did not answer within 30 s")
            peer, frame = router.recv_multipart()
            env_, body = decode(frame)
            if body == body_wanted:
                return peer, env_

    samples = []
    try:
        peer, _ = recv("register")
        router.send_multipart([peer, encode("scheduler", pb.Registered(accepted=True))])
        for i in range(iters + 20):
            t0 = time.perf_counter()
            router.send_multipart([peer, encode("scheduler", plan_to_proto(plan))])
            _, env_ = recv("result")
            res = result_from_proto(env_.result, "echo")
            dt = time.perf_counter() - t0
            assert len(res.tokens) == len(plan.sampled_ids())
            if i >= 20:
                samples.append(dt)
        router.send_multipart([peer, encode("scheduler", pb.Shutdown())])
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        router.close()
        ctx.term()

    result = StepResult(plan.step_id, "w0", [1] * len(plan.sampled_ids()), 0.0)

    def codec() -> None:
        env_, _ = decode(encode("scheduler", plan_to_proto(plan)))
        plan_from_proto(env_.plan, "w0")
        env_, _ = decode(encode("w0", result_to_proto(result)))
        result_from_proto(env_.result, "w0")

    codec_s = _median_time(codec, 200, "cpu")
    return {"roundtrip_s": float(statistics.median(samples)), "codec_s": codec_s}


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
    if model_dir is None:
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
        warm = _prompts(min(8, max(batches)), prompt_len, vocab, seed=0)
        for _ in range(2 if warmup else 0):
            ecoserve_decode(runner, warm, min(4, decode_steps))
            hf_decode(hf, warm, min(4, decode_steps), pad_id, device)
        for b in batches:
            prompts = _prompts(b, prompt_len, vocab, seed=b)
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
        pre = _prompts(prefill_prompts, prefill_len, vocab, seed=99)
        eco["prefill_tok_s"] = ecoserve_prefill(runner, pre, repeats)
        tra["prefill_tok_s"] = hf_prefill(hf, pre, repeats, device)
        log(
            f"prefill: ecoserve {eco['prefill_tok_s']:.0f}, transformers {tra['prefill_tok_s']:.0f}"
        )

        if zmq_batch in step_s:
            zstep = step_s[zmq_batch]
        else:
            zprompts = _prompts(zmq_batch, prompt_len, vocab, seed=zmq_batch)
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
    ap.add_argument("--model", default=None, help="HF model dir (default: build the tiny model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--prefill-prompts", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="few steps, for a smoke run")
    a = ap.parse_args(argv)
    steps = 4 if a.quick else a.decode_steps
    summary = run_bench(
        a.out,
        a.model,
        device=a.device,
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
