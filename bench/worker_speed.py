"""float32 against bfloat16 for the worker's runner on this CPU: which dtype should a CPU
worker default to?

    python bench/worker_dtype.py [--model smollm2-135m-instruct] [--repeats 5] \\
        [--threads 1 2] [--out results/worker-dtype]

For each torch thread count, both dtypes' runners (`ModelRunner`, the serving path: fused
projections, paged attention; fp32 also prepacks its weights for oneDNN) are loaded side by side
and timed alternately, fp32 then bf16, `--repeats` rounds, so drift on a shared machine hits both:

* decode_b1: one sequence (context `--context` tokens) decodes one token: median step time;
* decode_b16: 16 sequences (same context) decode one token each: median step time;
* prefill_256: one fresh 256-token prompt in one step: median step time.

Each round times `--steps` steps of a shape after one warm-up step. Speed is not all: the
bench also answers `QUESTIONS` greedily (chat template, 16 new tokens) in both dtypes and records
both answers and on how many of them bf16 says exactly what fp32 says. Writes OUT/summary.json
(machine, model, command, torch version, the medians, every round, the answers) and prints it.
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

REPO = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

from ecoserve_common.models import DEFAULT_MODEL, served_name  # noqa: E402
from ecoserve_worker.model_runner import ModelRunner  # noqa: E402
from ecoserve_worker.models import ensure_model  # noqa: E402

BLOCK = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx2")))
    except OSError:
        pass
    return []


def shapes(context: int, vocab: int) -> dict[str, list]:
    """Row tuples per shape; each sequence owns its own blocks."""
    per_seq = (max(context, 256) + 1 + BLOCK - 1) // BLOCK + 1
    ids = [(7 * i + 3) % vocab for i in range(max(context, 256))]

    def table(s: int) -> list[int]:
        return list(range(s * per_seq, (s + 1) * per_seq))

    return {
        "decode_b1": [("r0", [ids[0]], context, table(0))],
        "decode_b16": [(f"r{s}", [ids[s]], context, table(s)) for s in range(16)],
        "prefill_256": [("p", ids[:256], 0, table(16))],
    }


def fill_context(runner: ModelRunner, context: int, vocab: int) -> None:
    """Prefill the 16 decode sequences' contexts so decode attends over real KV."""
    per_seq = (max(context, 256) + 1 + BLOCK - 1) // BLOCK + 1
    ids = [(7 * i + 3) % vocab for i in range(context)]
    for s in range(16):
        runner.step([(f"r{s}", ids, 0, list(range(s * per_seq, (s + 1) * per_seq)))])


QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Write one sentence about the ocean.",
    "Who wrote Romeo and Juliet?",
]


def answers(runners: dict[str, ModelRunner], path: Path, n_new: int = 16) -> dict[str, dict]:
    """Each dtype's greedy answer to each question, through the runner (paged KV)."""
    from transformers import AutoTokenizer

    from ecoserve_worker.model_runner import greedy

    tok = AutoTokenizer.from_pretrained(path)
    out: dict[str, dict] = {}
    for q in QUESTIONS:
        prompt = list(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
            )
        )
        table = list(range((len(prompt) + n_new) // BLOCK + 1))
        out[q] = {}
        for name, r in runners.items():
            toks = greedy(r.step([("a", prompt, 0, table)]))
            while len(toks) < n_new and toks[-1] != tok.eos_token_id:
                toks += greedy(r.step([("a", [toks[-1]], len(prompt) + len(toks) - 1, table)]))
            out[q][name] = tok.decode(toks, skip_special_tokens=True)
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
    for n in threads:
        torch.set_num_threads(n)
        runners = {}
        for name, dtype in DTYPES.items():
            runners[name] = ModelRunner(path, "cpu", dtype, num_blocks=17 * 18, block_size=BLOCK)
            vocab = runners[name].config.vocab_size
            fill_context(runners[name], context, vocab)
        rows = shapes(context, vocab)
        rounds: dict[str, dict[str, list[float]]] = {
            shape: {d: [] for d in DTYPES} for shape in rows
        }
        for _ in range(repeats):
            for shape, seqs in rows.items():
                for name in DTYPES:  # alternate: fp32, bf16, fp32, bf16, ...
                    rounds[shape][name].append(time_shape(runners[name], seqs, steps))
        summary = {}
        for shape, by_dtype in rounds.items():
            med = {d: statistics.median(v) for d, v in by_dtype.items()}
            summary[shape] = {
                "median_ms": {d: round(v * 1e3, 3) for d, v in med.items()},
                "rounds_ms": {d: [round(x * 1e3, 3) for x in v] for d, v in by_dtype.items()},
                "bf16_speedup": round(med["float32"] / med["bfloat16"], 3),
            }
            print(
                f"threads={n} {shape}: fp32 {med['float32'] * 1e3:.2f} ms, "
                f"bf16 {med['bfloat16'] * 1e3:.2f} ms (bf16 x{summary[shape]['bf16_speedup']})",
                file=sys.stderr,
                flush=True,
            )
        results[f"threads_{n}"] = summary
        if n == threads[-1]:
            said = answers(runners, path)
        del runners
    same = sum(a["float32"] == a["bfloat16"] for a in said.values())
    faster = all(s["bf16_speedup"] > 1.0 for r in results.values() for s in r.values())
    return {
        "model": {"name": served_name(model), "path": str(path)},
        "machine": {
            "cpu": _cpu_name(),
            "cpu_flags": _cpu_flags(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "mkldnn_bf16": bool(
                getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
                and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            ),
        },
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "setup": {"context": context, "steps_per_round": steps, "repeats": repeats},
        "results": results,
        "answers": said,
        "bf16_same_answer": f"{same}/{len(said)}",
        # bf16 becomes the default only if it is faster everywhere AND greedy answers agree:
        # a faster default that changes what the model says is not the same model.
        "cpu_default_dtype": "bfloat16" if faster and same == len(said) else "float32",
        "cpu_default_reason": (
            f"bf16 faster on every shape: {faster}; bf16 greedy answer equals fp32's on "
            f"{same}/{len(said)} questions"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per shape per round")
    ap.add_argument("--context", type=int, default=128, help="decode context length")
    ap.add_argument("--out", default="results/worker-dtype")
    args = ap.parse_args(argv)
    summary = run(args.model, args.threads, args.repeats, args.steps, args.context)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
