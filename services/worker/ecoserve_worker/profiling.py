"""Start-up self-profiling: step latency against batch shape, the token budget, timing rows.

`profile_runner` times `ModelRunner.step` over a small grid of batch shapes (pure prefill of T
tokens, pure decode of B sequences at a few context lengths, and mixed prefill + decode) using
block tables it carves out of the runner's own pool as contiguous ranges. Each row is in the
format the simulator's cost model is fitted from (`ecoserve_scheduler.sim.cost_model.load_timings`
/ `fit_profile`): prefill_tokens, prefill_context_tokens, decode_seqs, decode_context_tokens,
latency_s, plus prefill_chunks ([[tokens, context], ...]) and a `kind` tag.

`token_budget` picks the smallest prefill size whose throughput reaches a fraction of the best
measured prefill throughput: past it, bigger batches only add latency.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Default grid: small enough to profile the tiny model in a few seconds on a 2-core CPU.
PREFILL_TOKENS = (16, 32, 64, 128, 256, 512, 1024)
DECODE_SEQS = (1, 8, 32, 128)
DECODE_CONTEXTS = (16, 128, 512)
MIXED = ((64, 8, 64), (128, 32, 128), (256, 8, 256))  # (prefill tokens, decode seqs, context)

# A shape: (prefill_tokens, prefill_context_tokens, decode_seqs, decode_context_per_seq).
Shape = tuple[int, int, int, int]


def default_shapes() -> list[Shape]:
    """The default profiling grid as (prefill, prefill ctx, decode seqs, ctx per decode seq)."""
    shapes: list[Shape] = [(t, 0, 0, 0) for t in PREFILL_TOKENS]
    shapes += [(0, 0, b, c) for c in DECODE_CONTEXTS for b in DECODE_SEQS]
    shapes += [(p, 0, b, c) for p, b, c in MIXED]
    return shapes


def budget_shapes() -> list[Shape]:
    """What `token_budget` reads: pure prefill steps, smallest first. A worker starting up
    times only these (the whole grid is for `--profile-out`, the simulator's cost model)."""
    return [(t, 0, 0, 0) for t in PREFILL_TOKENS]


def _blocks_needed(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def shape_fits(runner, shape: Shape) -> bool:
    """Whether the runner's pool has the blocks a shape needs."""
    prefill, pctx, seqs, ctx = shape
    bs = runner.block_size
    need = (_blocks_needed(pctx + prefill, bs) if prefill else 0) + seqs * _blocks_needed(
        ctx + 1, bs
    )
    return need <= runner.num_blocks


def build_step(runner, shape: Shape, vocab: int | None = None) -> list[tuple]:
    """The `runner.step` input for a shape, block tables contiguous from block 0 of the pool.

    A decode sequence at context `ctx` runs one token at position `ctx` (its cached K/V is
    whatever the pool holds: the attention cost is the same), a prefill runs `prefill` tokens
    after `pctx` cached ones.
    """
    prefill, pctx, seqs, ctx = shape
    bs = runner.block_size
    vocab = vocab or int(runner.config.vocab_size)
    out: list[tuple] = []
    nxt = 0
    if prefill:
        n = _blocks_needed(pctx + prefill, bs)
        ids = [(7 * i + 3) % vocab for i in range(prefill)]
        out.append(("prefill", ids, pctx, list(range(nxt, nxt + n))))
        nxt += n
    for s in range(seqs):
        n = _blocks_needed(ctx + 1, bs)
        out.append((f"d{s}", [(11 * s + 5) % vocab], ctx, list(range(nxt, nxt + n))))
        nxt += n
    if nxt > runner.num_blocks:
        raise ValueError(f"shape {shape} needs {nxt} blocks, pool has {runner.num_blocks}")
    return out


def _sync(runner) -> None:
    dev = getattr(runner, "device", None)
    if dev is not None and getattr(dev, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(dev)


# A step whose warm-up took longer than this is timed once: its run-to-run spread is small next
# to its length, and the long steps are most of a profile's time.
LONG_STEP_S = 0.25


def time_step(runner, seqs: Sequence[tuple], repeats: int = 3) -> float:
    """Median wall time of `runner.step(seqs)` over `repeats` runs after one warm-up (one run
    where the warm-up took over LONG_STEP_S)."""
    t0 = time.perf_counter()
    runner.step(seqs)
    _sync(runner)
    if time.perf_counter() - t0 > LONG_STEP_S:
        repeats = 1
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        runner.step(seqs)
        _sync(runner)
        samples.append(time.perf_counter() - t0)
    return float(statistics.median(samples))


def row_for(shape: Shape, latency_s: float) -> dict[str, Any]:
    prefill, pctx, seqs, ctx = shape
    kind = "mixed" if prefill and seqs else ("prefill" if prefill else "decode")
    return {
        "kind": kind,
        "prefill_tokens": prefill,
        "prefill_context_tokens": pctx,
        "prefill_chunks": [[prefill, pctx]] if prefill else [],
        "decode_seqs": seqs,
        "decode_context_tokens": seqs * ctx,
        "latency_s": latency_s,
    }


def profile_runner(
    runner,
    shapes: Iterable[Shape] | None = None,
    repeats: int = 3,
    stop_above_s: float | None = None,
) -> list[dict[str, Any]]:
    """Time `runner.step` over a grid of batch shapes; rows in the cost model's timing format.

    Shapes that do not fit the runner's pool (or its max positions) are skipped. With
    `stop_above_s` (for shapes in growing order, as `budget_shapes`), timing stops after the
    first step slower than that: the bigger ones would be too, and no budget takes them.
    """
    max_pos = getattr(getattr(runner, "config", None), "max_position_embeddings", None)
    rows = []
    for shape in default_shapes() if shapes is None else shapes:
        shape = tuple(int(v) for v in shape)
        prefill, pctx, _, ctx = shape
        if not shape_fits(runner, shape):
            continue
        if max_pos is not None and max(pctx + prefill, ctx + 1) > max_pos:
            continue
        latency = time_step(runner, build_step(runner, shape), repeats)
        rows.append(row_for(shape, latency))
        if stop_above_s is not None and latency > stop_above_s:
            break
    return rows


def token_budget(
    rows: Iterable[Mapping[str, Any]],
    fraction: float = 0.9,
    step: int = 16,
    step_target_s: float | None = None,
) -> int:
    """The tokens per step a worker announces, from its pure-prefill rows (no decode sequences,
    no cached context).

    The knee: the smallest measured prefill size whose tokens/s reaches `fraction` of the best
    one (past it, bigger steps only add latency). With `step_target_s`, the budget grows past
    the knee to the largest measured size whose step still takes at most that long: on a CPU
    in bf16 the knee sits at 64 tokens (a 64-token step already runs at 90% of peak prefill
    speed), and a 64-token budget splits a 500-token prompt into 8 steps and caps the decode
    batch at 64 rows; the target bounds how long one step may hold the running requests.
    Rounded up to a multiple of `step`.
    """
    best: dict[int, float] = {}
    slowest: dict[int, float] = {}
    for r in rows:
        tokens = int(r.get("prefill_tokens") or 0)
        if (
            tokens <= 0
            or int(r.get("decode_seqs") or 0)
            or int(r.get("prefill_context_tokens") or 0)
        ):
            continue
        latency = float(r["latency_s"])
        best[tokens] = max(best.get(tokens, 0.0), tokens / latency)
        slowest[tokens] = max(slowest.get(tokens, 0.0), latency)
    if not best:
        raise ValueError("token_budget needs at least one pure prefill row")
    peak = max(best.values())
    budget = min(t for t, tps in best.items() if tps >= fraction * peak)
    if step_target_s is not None:
        fits = [t for t, lat in slowest.items() if lat <= step_target_s]
        budget = max([budget, *fits])
    return -(-budget // step) * step if step > 1 else budget


def write_timings(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as JSONL (one object per line), loadable by the cost model's load_timings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(dict(r), sort_keys=True) + "\n")
    return path
