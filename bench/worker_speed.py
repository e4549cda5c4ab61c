"""The worker's step speed on the real model, per dtype and torch thread count, and what each
dtype says: what `make bench-worker` writes to results/worker/summary.json.

    python bench/worker_speed.py [--model smollm2-135m-instruct] [--threads 1 2] \\
        [--repeats 5] [--context 256] [--out results/worker]

For each thread count, one `ModelRunner` per dtype (the serving path: fused, oneDNN-prepacked
projections, paged attention) is loaded side by side and timed alternately, fp32 then bf16,
`--repeats` rounds of `--steps` steps after a warm-up, so drift on a shared machine hits both:

* decode_b1 / decode_b16 / decode_b64: that many sequences (context `--context` tokens of real
  KV, prefilled first) decode one token each; reported as output tokens/s;
* prefill_512: one fresh 512-token prompt in one step; reported as prompt tokens/s.

Speed is not all: every dtype also answers `QUESTIONS` greedily (chat template, 16 new
tokens), and transformers' own `generate` answers them in the same dtype; the summary records
on how many questions the worker's tokens equal transformers' in that dtype, and on how many
bf16 says what fp32 says. Writes OUT/summary.json (machine, model, command, torch version,
medians, every round, the answers) and prints it.
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

from ecoserve_common.models import DEFAULT_MODEL, served_name
from ecoserve_worker.cpuinfo import cpu_flags, cpu_model
from ecoserve_worker.dtypes import default_dtype
from ecoserve_worker.model_runner import ModelRunner, greedy
from ecoserve_worker.models import ensure_model

BLOCK = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BATCHES = (1, 16, 64)
PREFILL = 512
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Write one sentence about the ocean.",
    "Who wrote Romeo and Juliet?",
    "Explain in one sentence what a KV cache is.",
    "List three fruits.",
]


def shapes(context: int, vocab: int) -> tuple[dict[str, list], int]:
    """Row tuples per shape (each decode sequence owns its blocks) and the blocks needed."""
    per_seq = (context + 1 + BLOCK - 1) // BLOCK
    ids = [(7 * i + 3) % vocab for i in range(PREFILL)]

    def table(s: int) -> list[int]:
        return list(range(s * per_seq, (s + 1) * per_seq))

    rows = {
        f"decode_b{b}": [(f"r{s}", [ids[s]], context, table(s)) for s in range(b)] for b in BATCHES
    }
    first = max(BATCHES) * per_seq
    rows[f"prefill_{PREFILL}"] = [("p", ids, 0, list(range(first, first + PREFILL // BLOCK)))]
    return rows, first + PREFILL // BLOCK


def fill_context(runner: ModelRunner, context: int, vocab: int) -> None:
    """Prefill the decode sequences' contexts so decode attends over real KV."""
    per_seq = (context + 1 + BLOCK - 1) // BLOCK
    ids = [(7 * i + 3) % vocab for i in range(context)]
    for s in range(max(BATCHES)):
        runner.step([(f"r{s}", ids, 0, list(range(s * per_seq, (s + 1) * per_seq)))])


def prompts(path: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    return [
        list(tok.apply_chat_template(m, add_generation_prompt=True, return_dict=False))
        for m in msgs
    ]


def worker_answer(runner: ModelRunner, prompt: list[int], eos: int, n_new: int) -> list[int]:
    table = list(range((len(prompt) + n_new) // BLOCK + 1))
    toks = greedy(runner.step([("a", prompt, 0, table)]))
    while len(toks) < n_new and toks[-1] != eos:
        toks += greedy(runner.step([("a", [toks[-1]], len(prompt) + len(toks) - 1, table)]))
    return toks


def reference_answer(model, prompt: list[int], n_new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False)
    return out[0, len(prompt) :].tolist()


def answers(runners: dict[str, ModelRunner], path: Path, n_new: int = 16) -> dict:
    """Each dtype's greedy tokens and text per question, beside transformers' in that dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    asked = prompts(path)
    out: dict = {"questions": {q: {} for q in QUESTIONS}, "equal_to_transformers": {}}
    for name, runner in runners.items():
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[name]).eval()
        same = 0
        for q, p in zip(QUESTIONS, asked, strict=True):
            ours = worker_answer(runner, p, tok.eos_token_id, n_new)
            ref = reference_answer(hf, p, n_new)
            same += ours == ref
            out["questions"][q][name] = tok.decode(ours, skip_special_tokens=True)
            out["questions"][q][f"transformers_{name}"] = tok.decode(ref, skip_special_tokens=True)
        out["equal_to_transformers"][name] = f"{same}/{len(QUESTIONS)}"
        del hf
    same = sum(a["float32"] == a["bfloat16"] for a in out["questions"].values())
    out["bfloat16_says_what_float32_says"] = f"{same}/{len(QUESTIONS)}"
    return out


def time_shape(runner: ModelRunner, rows: list, steps: int) -> float:
    runner.step(rows)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.step(rows)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(model: str, threads: list[int], repeats: int, steps: int, context: int) -> dict:
    path = ensure_model(model)
    results: dict[str, dict] = {}
    said: dict = {}
    for n in threads:
        torch.set_num_threads(n)
        runners = {}
        vocab = 0
        for name, dtype in DTYPES.items():
            _, blocks = shapes(context, 1)
            runners[name] = ModelRunner(path, "cpu", dtype, num_blocks=blocks, block_size=BLOCK)
            vocab = runners[name].config.vocab_size
            fill_context(runners[name], context, vocab)
        rows, _ = shapes(context, vocab)
        rounds = {shape: {d: [] for d in DTYPES} for shape in rows}
        for _ in range(repeats):
            for shape, seqs in rows.items():
                for name in DTYPES:  # alternate: fp32, bf16, fp32, bf16, ...
                    rounds[shape][name].append(time_shape(runners[name], seqs, steps))
        summary = {}
        for shape, by_dtype in rounds.items():
            tokens = sum(len(r[1]) for r in rows[shape])
            med = {d: statistics.median(v) for d, v in by_dtype.items()}
            summary[shape] = {
                "tok_s": {d: round(tokens / v, 1) for d, v in med.items()},
                "median_step_ms": {d: round(v * 1e3, 3) for d, v in med.items()},
                "rounds_ms": {d: [round(x * 1e3, 3) for x in v] for d, v in by_dtype.items()},
                "bf16_speedup": round(med["float32"] / med["bfloat16"], 3),
            }
            tps = summary[shape]["tok_s"]
            print(
                f"threads={n} {shape}: fp32 {tps['float32']} tok/s, bf16 {tps['bfloat16']} "
                f"tok/s (bf16 x{summary[shape]['bf16_speedup']})",
                file=sys.stderr,
                flush=True,
            )
        results[f"threads_{n}"] = summary
        if n == threads[-1]:
            said = answers(runners, path)
        del runners
    flags = cpu_flags()
    return {
        "model": {"name": served_name(model), "path": str(path)},
        "machine": {
            "cpu": cpu_model(),
            "cpu_flags": sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx2"))),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "setup": {"context": context, "steps_per_round": steps, "repeats": repeats},
        "worker_default_dtype_here": default_dtype("cpu"),
        "results": results,
        "answers": said,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per shape per round")
    ap.add_argument("--context", type=int, default=256, help="decode context length")
    ap.add_argument("--out", default="results/worker")
    args = ap.parse_args(argv)
    summary = run(args.model, args.threads, args.repeats, args.steps, args.context)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
