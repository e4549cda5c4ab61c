"""`ecoserve demo`: start the local stack (`ecoserve up`'s processes, on SmolLM2-135M-Instruct
unless --model says otherwise), replay a slice of the ShareGPT workload against it through the
Python SDK with Poisson arrivals, print a table, then ask the model a few short questions through
the OpenAI-compatible chat API and print its answers.

Each replayed request sends a real ShareGPT prompt (cut to `--prompt-chars`) and asks for its
real response length (capped at `--max-output`; EOS ignored, so every request produces that
many tokens whatever the model). Without the data folder it uses synthetic prompts and says so.
TTFT is measured by the client (first streamed chunk), so it includes the network and queue.
The questions are chat completions (the model's chat template), greedy, ending at the model's
end of turn or after `--answer-tokens`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

from .launcher import build_parser as up_parser
from .launcher import free_port, start_stack, stop_all

QUESTIONS = (
    "What is the capital of France?",
    "What is the largest planet in the solar system?",
    "Name three primary colors.",
)


def build_parser() -> argparse.ArgumentParser:
    p = up_parser()
    p.prog = "ecoserve demo"
    p.description = "Replay a ShareGPT slice against the local stack and print a table."
    p.set_defaults(grpc_port=0, http_port=0, workers=2)
    p.add_argument("--n", type=int, default=40, help="requests to replay")
    p.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second")
    p.add_argument("--max-output", type=int, default=48, help="cap on tokens per response")
    p.add_argument("--answer-tokens", type=int, default=48, help="cap on each answer's tokens")
    p.add_argument("--questions", type=int, default=len(QUESTIONS), help="questions to ask")
    p.add_argument("--prompt-chars", type=int, default=1500)
    p.add_argument("--data-dir", default=None, help="default: ../shared/data")
    p.add_argument("--ttft-slo-s", type=float, default=1.0)
    p.add_argument("--tpot-slo-s", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def workload(a) -> tuple[str, list[tuple[str, int]]]:
    from ecoserve_predictor.data import DEFAULT_DATA_DIR, load_sharegpt, synthetic_pairs

    rng = random.Random(a.seed)
    try:
        pairs = load_sharegpt(a.data_dir or DEFAULT_DATA_DIR)
        name = f"ShareGPT ({a.data_dir or DEFAULT_DATA_DIR})"
    except FileNotFoundError as exc:
        pairs = synthetic_pairs(max(a.n, 100), a.seed)
        name = f"synthetic prompts ({exc})"
    chosen = rng.sample(pairs, min(a.n, len(pairs)))
    return name, [
        (p.prompt[: a.prompt_chars], max(1, min(p.response_tokens, a.max_output))) for p in chosen
    ]


def timing(reason, tokens: int, t0: float, first: float | None, end: float) -> dict:
    """One request's client-side result, as `summarize` reads it."""
    return {
        "ok": reason in ("length", "stop"),
        "tokens": tokens,
        "ttft_s": (first or end) - t0,
        "jct_s": end - t0,
        "tpot_s": (end - first) / (tokens - 1) if first and tokens > 1 else 0.0,
    }


def replay(
    address: str, items, rate: float, seed: int, progress=None, slo_classes=None
) -> list[dict]:
    """Send `items` (prompt, max_tokens) at Poisson `rate` arrivals, one thread per request;
    client-side timings per request (`timing`). `slo_classes`: each request's SLO class name,
    asked for and recorded (bench/live.py's two-class workload)."""
    from ecoserve_client import Client, EcoServeError

    rng = random.Random(seed)
    results: list[dict] = [{} for _ in items]
    client = Client(address, timeout_s=600)

    def one(i: int, prompt: str, n: int) -> None:
        t0 = time.perf_counter()
        first = None
        slo = {} if slo_classes is None else {"slo_class": slo_classes[i]}
        try:
            tokens = 0
            for chunk in client.generate(prompt, max_tokens=n, ignore_eos=True, **slo):
                if chunk.token_ids and first is None:
                    first = time.perf_counter()
                tokens += len(chunk.token_ids)
                reason = chunk.finish_reason
            end = time.perf_counter()
            results[i] = timing(reason, tokens, t0, first, end)
        except EcoServeError as e:
            results[i] = {"ok": False, "error": str(e)}
        results[i].update(slo)
        if progress:
            progress()

    threads = []
    start = time.perf_counter()
    at = 0.0
    for i, (prompt, n) in enumerate(items):
        at += rng.expovariate(rate)
        delay = start + at - time.perf_counter()
        if delay > 0:
            threading.Event().wait(delay)
        t = threading.Thread(target=one, args=(i, prompt, n))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    client.close()
    return results


def ask(http_address: str, model: str, questions, max_tokens: int) -> list[tuple[str, str]]:
    """(question, answer) pairs: one greedy chat completion each through the official `openai`
    client, as a user would ask (the model's chat template is applied by the scheduler)."""
    from openai import OpenAI, OpenAIError

    client = OpenAI(base_url=f"http://{http_address}/v1", api_key="none", timeout=300)
    pairs = []
    for q in questions:
        try:
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": q}],
                max_tokens=max_tokens,
                temperature=0,
            )
            answer = (reply.choices[0].message.content or "").strip()
        except OpenAIError as exc:
            answer = f"(no answer: {exc})"
        pairs.append((q, answer))
    return pairs


def summarize(results: list[dict], elapsed: float, a) -> dict:
    ok = [r for r in results if r.get("ok")]

    def pct(key, q):
        xs = sorted(r[key] for r in ok)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    met = [r for r in ok if r["ttft_s"] <= a.ttft_slo_s and r["tpot_s"] <= a.tpot_slo_s]
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "elapsed_s": elapsed,
        "throughput_req_s": len(ok) / elapsed,
        "throughput_tok_s": sum(r["tokens"] for r in ok) / elapsed,
        "ttft_p50_s": pct("ttft_s", 0.5),
        "ttft_p99_s": pct("ttft_s", 0.99),
        "tpot_p50_s": statistics.median(r["tpot_s"] for r in ok) if ok else float("nan"),
        "tpot_p99_s": pct("tpot_s", 0.99),
        "jct_p50_s": pct("jct_s", 0.5),
        "jct_p99_s": pct("jct_s", 0.99),
        "slo": {"ttft_s": a.ttft_slo_s, "tpot_s": a.tpot_slo_s},
        "slo_attainment": len(met) / len(results) if results else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    a = build_parser().parse_args(argv)
    a.grpc_port = a.grpc_port or free_port()
    a.http_port = a.http_port or free_port()
    console = Console()
    name, items = workload(a)
    console.print(f"workload: {name}, {len(items)} requests at {a.rate:g} req/s (Poisson)")
    stack = start_stack(a)
    try:
        console.print(stack.describe(a.workers, a.policy))
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("replaying", total=len(items))
            t0 = time.perf_counter()
            results = replay(stack.grpc_address, items, a.rate, a.seed, lambda: bar.advance(task))
            elapsed = time.perf_counter() - t0
        from ecoserve_common.models import served_name

        model = served_name(stack.model)
        answers = ask(stack.http_address, model, QUESTIONS[: a.questions], a.answer_tokens)
    finally:
        stop_all(stack.procs)
    summary = {
        "workload": name,
        "model": model,
        "policy": a.policy,
        "workers": a.workers,
        **summarize(results, elapsed, a),
    }
    table = Table(title=f"EcoServe live demo: policy {a.policy}, {a.workers} worker(s)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key in ("workload", "model", "slo"):
            continue
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(
        f"model {model} ({stack.model_dir}); workload: {name}, {len(items)} requests at "
        f"{a.rate:g} req/s, up to {a.max_output} output tokens each"
    )
    for q, answer in answers:
        console.print(f"[bold]Q:[/bold] {escape(q)}", highlight=False)
        console.print(f"[bold]A:[/bold] {escape(answer)}", highlight=False)
    summary["answers"] = [{"question": q, "answer": ans} for q, ans in answers]
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
