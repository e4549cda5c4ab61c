"""bench/worker.py's measurements of the runner and of plain transformers: decode and prefill
tok/s, and one decode step at unequal context lengths (grouped by length or padded)."""

from __future__ import annotations

import random
import statistics
import time

import torch

from ecoserve_worker.model_runner import ModelRunner, greedy


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def prompts_for(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip the first few ids (special tokens of the tiny tokenizer).
    return torch.randint(4, vocab, (batch, length), generator=g).tolist()


def median_time(fn, repeats: int, device: str) -> float:
    fn()
    sync(device)
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync(device)
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
    sync(runner.device)
    t0 = time.perf_counter()
    for s in range(steps):
        pos = length + s
        seqs = [(rid, [tok], pos, t) for rid, tok, t in zip(rids, nxt, tables, strict=True)]
        nxt = greedy(runner.step(seqs))
    sync(runner.device)
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
        return median_time(lambda: runner.step(seqs), repeats, str(runner.device))
    finally:
        mr.GROUP_OVERHEAD_BLOCKS = saved


def ecoserve_prefill(runner: ModelRunner, prompts: list[list[int]], repeats: int) -> float:
    bs = runner.block_size
    per_seq = -(-len(prompts[0]) // bs)
    seqs = [
        (f"p{i}", p, 0, list(range(i * per_seq, (i + 1) * per_seq))) for i, p in enumerate(prompts)
    ]
    t = median_time(lambda: runner.step(seqs), repeats, str(runner.device))
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
        sync(device)
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
        sync(device)
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

    return ids.numel() / median_time(fwd, repeats, device)
