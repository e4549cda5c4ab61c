"""Whole-model weight-only quantization (`--quantization`) on the real model: decode speed at
batch 1 and 16, where the hybrid threshold lies, and what it does to the answers.

    python bench/worker_quant.py --whole-model [--parts speed batch quality] [--repeats 5]

One `ModelRunner` (bf16, 1 thread, the serving path: oneDNN-prepacked dense projections, C++
glue, paged attention) carries every mode: each mode's `quant.QuantProj` wrappers are built
once and swapped into the runner's layers, so the modes share the KV pool and the dense
weights, and are timed alternately (drift on a shared machine hits all of them). Modes: none;
int8 and int4 as the worker runs them (decoder projections quantized, lm_head dense), and each
with the lm_head quantized too (`+head`).

* speed: single stream, a ~100-token chat prompt prefilled, then `--new` greedy decode steps
  timed as a whole (tok/s), `--repeats` rounds;
* batch: ms per decode step at 1, 2, 3, 4, 6, 8, 16 rows (each row a sequence with 128 tokens of
  context), quantized kernels at every row count: where they stop winning is the hybrid
  threshold (`quant.MAX_ROWS`); batch-16 tok/s with the quantized kernels and with the hybrid;
* quality: greedy answers of `--prompts` chat prompts x `--quality-new` tokens, each mode beside
  the unquantized bf16 model (free-running: answers equal, tokens before the first difference;
  teacher-forced: top-1 agreement on the unquantized answer), and perplexity of every mode
  on ShareGPT answers (chat-templated conversations, loss on the answer tokens only). Quality
  runs the quantized kernels at every row count, so prefill uses them too.

Prompts and texts come from ShareGPT (/work/shared/data/sharegpt_v3_pairs.jsonl.gz, or
$SHAREGPT) where present, else synthetic questions.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ecoserve_worker.model_runner import ModelRunner, greedy, inputs_from_rows
from ecoserve_worker.quant import MAX_ROWS, QuantProj, quantize_runner

BLOCK = 16
BIG = 1 << 30  # max_rows that sends every step through the quantized kernels
BATCHES = (1, 2, 3, 4, 6, 8, 16)
CONTEXT = 128
SHAREGPT = Path(os.environ.get("SHAREGPT", "/work/shared/data/sharegpt_v3_pairs.jsonl.gz"))
SYNTHETIC = [
    "What is the capital of France?",
    "Explain how a bicycle works.",
    "Write a short poem about the sea.",
    "Why is the sky blue?",
    "Give three tips for learning a new language.",
]


# ---- modes: sets of projections swapped into one runner ------------------------------------


def snapshot(runner: ModelRunner) -> tuple[list, object]:
    return [(x.qkv, x.o_proj, x.gate_up, x.down) for x in runner.layers], runner.lm_head


def install(runner: ModelRunner, mode: tuple[list, object]) -> None:
    layers, head = mode
    for layer, (qkv, o, gu, down) in zip(runner.layers, layers, strict=True):
        layer.qkv, layer.o_proj, layer.gate_up, layer.down = qkv, o, gu, down
    runner.lm_head = head


def shipped(name: str) -> int:
    """The mode's row threshold as the worker runs it (quant.MAX_ROWS)."""
    return MAX_ROWS.get(name.removesuffix("+head"), 0)


def set_max_rows(mode: tuple[list, object], rows: int) -> None:
    """Every quantized projection of `mode` runs its quantized kernel up to `rows` rows."""
    layers, head = mode
    for p in [*(p for ps in layers for p in ps), head]:
        if isinstance(p, QuantProj):
            p.max_rows = rows


def build_modes(runner: ModelRunner) -> tuple[dict, dict]:
    """{name: projections} and {name: quantized MiB}; the runner is left on `none`."""
    dense = snapshot(runner)
    modes, mib = {"none": dense}, {"none": 0.0}
    for q in ("int8", "int4"):
        install(runner, dense)
        report = quantize_runner(runner, q, lm_head=True)
        full = snapshot(runner)
        head_mib = full[1].quant.nbytes() / 2**20 if isinstance(full[1], QuantProj) else 0.0
        modes[q], modes[f"{q}+head"] = (full[0], dense[1]), full
        mib[f"{q}+head"] = round(report.extra_bytes / 2**20, 1)
        mib[q] = round(report.extra_bytes / 2**20 - head_mib, 1)
    install(runner, dense)
    return modes, mib


# ---- inputs ------------------------------------------------------------------------------------


def sharegpt_pairs(limit: int) -> list[tuple[str, str]]:
    """The first `limit` (prompt, answer) pairs of a moderate size, in file order."""
    if not SHAREGPT.is_file():
        return []
    out = []
    with gzip.open(SHAREGPT, "rt") as f:
        for line in f:
            row = json.loads(line)
            p, r = row.get("prompt", ""), row.get("response", "")
            if 40 <= len(p) <= 500 and len(r) >= 600 and p.isascii() and r.isascii():
                out.append((p, r))
                if len(out) >= limit:
                    break
    return out


def chat(tok, prompt: str, answer: str | None = None) -> list[int]:
    if not tok.chat_template:  # the tiny test model: plain text
        return list(tok(prompt + ("" if answer is None else " " + answer)).input_ids)
    msgs = [{"role": "user", "content": prompt}]
    if answer is None:
        return list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False))
    msgs.append({"role": "assistant", "content": answer})
    return list(tok.apply_chat_template(msgs, return_dict=False))


# ---- measurements ------------------------------------------------------------------------------


def decode(runner: ModelRunner, prompt: list[int], n: int, table: list[int]) -> list[int]:
    """Greedy: prefill `prompt`, then n - 1 single-token decode steps; the n tokens."""
    out = greedy(runner.step([("s", prompt, 0, table)]))
    while len(out) < n:
        out += greedy(runner.step([("s", [out[-1]], len(prompt) + len(out) - 1, table)]))
    return out


def single_stream(runner, modes, prompt: list[int], new: int, repeats: int) -> dict:
    """tok/s of `new` decode steps after a prefill, per mode, modes alternated each round."""
    table = list(range((len(prompt) + new) // BLOCK + 1))
    rounds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats + 1):  # the first round warms up, not kept
        for name, mode in modes.items():
            install(runner, mode)
            out = greedy(runner.step([("s", prompt, 0, table)]))
            t0 = time.perf_counter()
            while len(out) <= new:
                out += greedy(runner.step([("s", [out[-1]], len(prompt) + len(out) - 1, table)]))
            rounds[name].append(new / (time.perf_counter() - t0))
    for v in rounds.values():
        v.pop(0)
    med = {m: statistics.median(v) for m, v in rounds.items()}
    for m in modes:
        print(f"single stream {m}: {med[m]:.1f} tok/s", file=sys.stderr, flush=True)
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": new,
        "tok_s": {m: round(v, 1) for m, v in med.items()},
        "speedup_vs_none": {m: round(v / med["none"], 3) for m, v in med.items()},
        "rounds_tok_s": {m: [round(x, 1) for x in v] for m, v in rounds.items()},
    }


def batch_steps(runner, modes, vocab: int, repeats: int, steps: int, first_block: int) -> dict:
    """Median ms of a decode step of b rows (quantized kernels at every b), per mode."""
    per_seq = (CONTEXT + 1) // BLOCK + 1
    starts = [first_block + s * per_seq for s in range(max(BATCHES))]
    tables = [list(range(b, b + per_seq)) for b in starts]
    ids = [(7 * i + 3) % vocab for i in range(CONTEXT)]
    install(runner, modes["none"])
    for s, t in enumerate(tables):
        runner.step([(f"b{s}", ids, 0, t)])
    ms: dict[int, dict[str, list[float]]] = {b: {m: [] for m in modes} for b in BATCHES}
    for _ in range(repeats):
        for b in BATCHES:
            rows = [(f"b{s}", [ids[s]], CONTEXT, tables[s]) for s in range(b)]
            for name, mode in modes.items():
                install(runner, mode)
                set_max_rows(mode, BIG)
                runner.step(rows)  # warm-up
                for _ in range(steps):
                    t0 = time.perf_counter()
                    runner.step(rows)
                    ms[b][name].append((time.perf_counter() - t0) * 1e3)
                set_max_rows(mode, shipped(name))
    med = {b: {m: round(statistics.median(v), 2) for m, v in by.items()} for b, by in ms.items()}
    for b in BATCHES:
        print(f"decode step, {b} rows (ms): {med[b]}", file=sys.stderr, flush=True)
    # the hybrid: the quantized kernels up to the mode's threshold, the dense path (none) above
    hybrid_ms = {
        b: {m: v if b <= shipped(m) else by["none"] for m, v in by.items()} for b, by in med.items()
    }
    top = max(BATCHES)
    hybrid = hybrid_ms[top]
    return {
        "context": CONTEXT,
        "median_step_ms_quantized_at_every_row_count": {f"rows_{b}": v for b, v in med.items()},
        "threshold_rows": MAX_ROWS,
        "median_step_ms_hybrid": {f"rows_{b}": v for b, v in hybrid_ms.items()},
        f"decode_b{top}_tok_s": {
            "quantized_kernels": {m: round(top * 1e3 / v, 1) for m, v in med[top].items()},
            "hybrid": {m: round(top * 1e3 / v, 1) for m, v in hybrid.items()},
        },
    }


@torch.inference_mode()
def all_logits(runner: ModelRunner, ids: list[int], table: list[int]) -> torch.Tensor:
    """fp32 logits at every position of one prefill ([T, vocab]); forward() keeps the last."""
    batch = runner.attention.batch(inputs_from_rows([("q", ids, 0, table)]))
    base = runner.model.model
    x = base.embed_tokens(batch.ids)
    cos, sin = runner._rope(batch.positions, batch.max_pos)
    layers = runner._layers_fused if runner.fused is not None else runner._layers_torch
    x = layers(x, cos, sin, batch)
    x = F.rms_norm(x, (runner.hidden_size,), base.norm.weight, runner.norm_eps)
    return runner.lm_head(x).float()


def quality(runner, modes, tok, prompts: list[list[int]], texts, new: int) -> dict:
    """Greedy answers vs the unquantized model's; perplexity on (prompt, answer) texts. The
    last entry, `none_torch_glue`, is a floor: the same unquantized weights through the pure
    torch glue (`_layers_torch`) instead of the C++ one, as correct but rounded differently."""
    table = list(range(max(len(p) for p in prompts) // BLOCK + new // BLOCK + 2))
    out: dict = {"prompts": len(prompts), "new_tokens": new}
    ref: list[list[int]] = []
    per: dict[str, dict] = {}
    fused = runner.fused
    for name, mode in [*modes.items(), ("none_torch_glue", modes["none"])]:
        install(runner, mode)
        set_max_rows(mode, BIG)
        runner.fused = None if name == "none_torch_glue" else fused
        answers = [decode(runner, p, new, table) for p in prompts]
        if name == "none":
            ref = answers
        same = prefix = top1 = 0
        for p, a, r in zip(prompts, answers, ref, strict=True):
            same += a == r
            prefix += next((i for i, (x, y) in enumerate(zip(a, r, strict=True)) if x != y), new)
            # teacher-forced: this mode's argmax after each prefix of the reference answer
            pred = all_logits(runner, p + r[:-1], table)[len(p) - 1 :].argmax(-1).tolist()
            top1 += sum(x == y for x, y in zip(pred, r, strict=True))
        n_tok = len(prompts) * new
        per[name] = {
            "answers_equal": f"{same}/{len(prompts)}",
            "tokens_before_first_difference_pct": round(100 * prefix / n_tok, 1),
            "teacher_forced_top1_agreement_pct": round(100 * top1 / n_tok, 2),
            "perplexity": perplexity(runner, texts),
            "first_answer": tok.decode(answers[0], skip_special_tokens=True)[:200],
        }
        set_max_rows(mode, shipped(name))
        print(f"quality {name}: {per[name]}", file=sys.stderr, flush=True)
    runner.fused = fused
    out["modes"] = per
    return out


def perplexity(runner, texts: list[tuple[list[int], int]]) -> float:
    """exp(mean NLL) over the answer tokens of every (ids, answer start) text."""
    nll, count = 0.0, 0
    for ids, start in texts:
        table = list(range(len(ids) // BLOCK + 1))
        logits = all_logits(runner, ids, table)[start - 1 : -1]
        target = torch.tensor(ids[start:])
        nll += float(F.cross_entropy(logits, target, reduction="sum"))
        count += len(target)
    return round(math.exp(nll / count), 4)


def run(path: Path, parts: list[str], repeats: int, new: int, n_prompts: int, q_new: int) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path)
    runner = ModelRunner(path, "cpu", torch.bfloat16, num_blocks=512, block_size=BLOCK)
    modes, mib = build_modes(runner)
    vocab = runner.config.vocab_size
    pairs = sharegpt_pairs(n_prompts + 8)
    source = str(SHAREGPT) if pairs else "synthetic"
    result: dict = {
        "modes": "none; int8/int4 = decoder projections quantized, lm_head dense (what "
        "--quantization runs); +head = lm_head quantized too",
        "quantized_copy_mib": mib,
        "prompt_source": source,
    }
    if "speed" in parts:  # the chat prompt nearest 100 tokens
        asked = [chat(tok, q) for q in [p for p, _ in pairs] or SYNTHETIC]
        prompt = min(asked, key=lambda ids: abs(len(ids) - 100))
        result["single_stream"] = single_stream(runner, modes, prompt, new, repeats)
    if "batch" in parts:
        result["batch"] = batch_steps(runner, modes, vocab, repeats, 3, first_block=32)
    if "quality" in parts:
        if pairs:
            prompts = [chat(tok, p) for p, _ in pairs[:n_prompts]]
            texts = []
            for p, r in pairs[n_prompts : n_prompts + 8]:
                ids = chat(tok, p, r)[:512]
                texts.append((ids, min(len(chat(tok, p)), len(ids) - 16)))
        else:
            prompts = [chat(tok, q) for q in (SYNTHETIC * 4)[:n_prompts]]
            texts = [(chat(tok, q, q * 20)[:512], len(chat(tok, q))) for q in SYNTHETIC]
        result["quality"] = quality(runner, modes, tok, prompts, texts, q_new)
        result["quality"]["perplexity_texts"] = {
            "count": len(texts),
            "answer_tokens": sum(len(i) - s for i, s in texts),
        }
    return result
