"""What bench/peer_vllm.py measures, without starting a server: the chat workload, the streaming
chat client, the three load shapes (one at a time, a closed loop, Poisson arrivals), the rate
search, and the per-process CPU and KV readings.

Every request is a streaming POST /v1/chat/completions (the server applies the model's chat
template) with `ignore_eos`, greedy, `stream_options.include_usage`: TTFT is the first chunk
with content, the token count comes from the usage, TPOT = (end - first) / (tokens - 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from types import SimpleNamespace

import httpx

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from proc_cpu import children, cpu_seconds, process_cpu  # noqa: E402, F401 (re-exported)

from ecoserve_stack.demo import summarize, timing  # noqa: E402

SHAREGPT = "sharegpt_v3_pairs.jsonl.gz"
TARGET = 0.9  # share of requests that must meet both SLOs


# ---- workload ------------------------------------------------------------------------------


def chat_workload(data_dir, model_dir: str, count: int, prompt_limit: int, max_output: int, seed):
    """(description, items): `count` ShareGPT first-turn prompts (record `<id>_0`, turn 0;
    distinct texts) whose chat-templated input is at most `prompt_limit` tokens of the model's
    tokenizer, in a seeded random order; each item asks for the recorded answer length capped
    at `max_output`. Without the data file: synthetic prompts, and the description says so."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    path = Path(data_dir) / SHAREGPT
    if path.is_file():
        seen, rows = set(), []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if r["turn"] == 0 and r["id"].endswith("_0") and r["prompt"] not in seen:
                    seen.add(r["prompt"])  # cl100k length: a cheap first cut
                    if r["prompt_tokens"] <= 2 * prompt_limit:
                        rows.append((r["prompt"], int(r["response_tokens"])))
        name = f"ShareGPT first-turn prompts ({path})"
    else:
        from ecoserve_predictor.data import synthetic_pairs

        rows = [(p.prompt, p.response_tokens) for p in synthetic_pairs(4 * count, seed)]
        name = f"synthetic prompts ({path} not found)"
    random.Random(seed).shuffle(rows)
    items = []
    for prompt, answer in rows:
        messages = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        n = len(tok(text, add_special_tokens=False).input_ids)
        if n <= prompt_limit:
            out = max(1, min(answer, max_output))
            items.append({"messages": messages, "max_tokens": out, "prompt_tokens": n})
            if len(items) == count:
                break
    if len(items) < count:
        raise SystemExit(f"only {len(items)} prompts of <= {prompt_limit} tokens in {name}")
    return name, items


def requests_at(rate: float, n: int, seconds: float) -> int:
    """Requests offered at `rate`: `seconds` of arrivals, at least `n` (a short burst hides
    overload: bench/README.md)."""
    return max(n, round(rate * seconds))


def rate_items(pool: list, n: int, rate: float, seed: int) -> list:
    """The `n` prompts offered at `rate`: drawn from `pool` by the rate and the seed alone, so
    every system gets the same ones at the same rate, while different rates (and the other
    phases, which have their own prompts) rarely repeat a prompt that vLLM's prefix cache (on
    by default) could have kept."""
    return random.Random(f"{seed}/{rate:g}").sample(pool, min(n, len(pool)))


# ---- the client ----------------------------------------------------------------------------


async def chat_stream(client: httpx.AsyncClient, url: str, model: str, item: dict) -> dict:
    """One streaming chat completion; the client-side timing (`demo.timing`) or an error."""
    body = {
        "model": model,
        "messages": item["messages"],
        "max_tokens": item["max_tokens"],
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, chunks, usage, reason = None, 0, None, None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {await r.aread()!r}"[:300]}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "error": json.dumps(chunk["error"])[:300]}
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        first = first or time.perf_counter()  # not the role-only first chunk
                        chunks += 1
                    reason = choice.get("finish_reason") or reason
                usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
        end = time.perf_counter()
    except httpx.HTTPError as e:
        return {"ok": False, "error": repr(e)[:300]}
    return timing(reason, chunks if usage is None else usage, t0, first, end)


def _client(n: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 1))


async def sequential(base: str, model: str, items) -> tuple[list, float]:
    """One request at a time."""
    async with _client(1) as client:
        t0 = time.perf_counter()
        out = [await chat_stream(client, base + "/v1/chat/completions", model, it) for it in items]
    return out, time.perf_counter() - t0


async def closed_loop(base: str, model: str, items, concurrency: int) -> tuple[list, float]:
    """`concurrency` streams; each starts the next item as soon as its request ends."""
    out: list[dict] = [{} for _ in items]
    todo = iter(range(len(items)))
    async with _client(concurrency) as client:

        async def stream() -> None:
            for i in todo:  # one shared iterator: each index is taken once
                out[i] = await chat_stream(client, base + "/v1/chat/completions", model, items[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(stream() for _ in range(concurrency)))
    return out, time.perf_counter() - t0


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def poisson(base: str, model: str, items, rate: float, seed: int) -> tuple[list, float]:
    """Open loop: item i is sent at its Poisson arrival time (the same times for every system)."""
    out: list[dict] = [{} for _ in items]
    async with _client(len(items)) as client:

        async def at(i: int, delay: float) -> None:
            await asyncio.sleep(delay)
            out[i] = await chat_stream(client, base + "/v1/chat/completions", model, items[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(at(i, d) for i, d in enumerate(arrivals(len(items), rate, seed))))
    return out, time.perf_counter() - t0


# ---- server-side readings ------------------------------------------------------------------


def kv_usage(text: str) -> float | None:
    """KV in use as a fraction of capacity from a /metrics page: EcoServe's blocks held
    (reserved included) over its blocks, or vLLM's kv_cache_usage_perc (a fraction)."""
    from prometheus_client.parser import text_string_to_metric_families

    used = total = 0.0
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "vllm:kv_cache_usage_perc":
                return smp.value
            if smp.name == "ecoserve_kv_blocks":
                used += smp.value if smp.labels.get("state") == "used" else 0.0
                total += smp.value if smp.labels.get("state") == "total" else 0.0
    return used / total if total else None


async def watch_kv(base: str, samples: list[float], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            try:
                usage = kv_usage((await client.get(base + "/metrics")).text)
                if usage is not None:
                    samples.append(usage)
            except httpx.HTTPError:
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)


def phase(load, base: str, pids: dict, slo: dict, engine=None) -> tuple[dict, list]:
    """Run `load()` (a coroutine giving (results, elapsed)) while sampling KV use: (the client's
    summary plus CPU seconds of each server process (see process_cpu) and of this client,
    CPU seconds per generated token, the EcoServe engine's counters when `engine` is given;
    the per-request results)."""

    async def run():
        samples: list[float] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_kv(base, samples, stop))
        try:
            return *(await load()), samples
        finally:
            stop.set()
            await watcher

    cpu0 = process_cpu(pids)
    me0, eng0 = time.process_time(), engine() if engine else {}
    results, elapsed, kv = asyncio.run(run())
    cpu = {p: v - cpu0[p] for p, v in process_cpu(pids).items()}
    m = metrics(results, elapsed, slo, cpu, time.process_time() - me0)
    m["kv_usage_mean"] = sum(kv) / len(kv) if kv else None
    m["kv_usage_max"] = max(kv, default=None)
    if engine:
        eng1 = engine()
        m["engine"] = {k: eng1[k] - eng0.get(k, 0) for k in eng1 if k != "workers_dropped"}
    return m, results


def metrics(results: list[dict], elapsed: float, slo: dict, cpu: dict, client_cpu: float):
    """`demo.summarize` (TTFT/TPOT/JCT percentiles, attainment of both SLOs, throughput) plus
    goodput, the first errors, and CPU: seconds per process and per generated token."""
    bounds = SimpleNamespace(ttft_slo_s=slo["ttft_s"], tpot_slo_s=slo["tpot_s"])
    m = summarize(results, elapsed, bounds)
    m["goodput_req_s"] = m["slo_attainment"] * len(results) / elapsed if elapsed else 0.0
    m["errors"] = sorted({r["error"] for r in results if "error" in r})[:3]
    tokens = sum(r["tokens"] for r in results if r.get("ok"))
    m["output_tokens"] = tokens  # generated by the requests that completed
    m["cpu_s"] = {**cpu, "load-generator": client_cpu}
    per = {p: v / tokens if tokens else None for p, v in cpu.items()}
    per["server_total"] = sum(cpu.values()) / tokens if tokens else None
    m["cpu_s_per_token"] = per
    return m


def single_stream(results: list[dict]) -> dict:
    """Medians over requests sent one at a time: decode tok/s = (tokens - 1) / (end - first),
    and TTFT."""
    ok = [r for r in results if r.get("ok") and r["tokens"] > 1 and r["tpot_s"] > 0]
    return {
        "decode_tok_s_p50": statistics.median(1 / r["tpot_s"] for r in ok) if ok else None,
        "ttft_p50_s": statistics.median(r["ttft_s"] for r in ok) if ok else None,
        "requests": len(results),
        "measured": len(ok),
    }


# ---- the rate search -----------------------------------------------------------------------


def sig3(x: float) -> float:
    return float(f"{x:.3g}")


def rate_search(
    start: float = 0.5,
    factor: float = 1.5,
    cap: float = 16.0,
    fails: int = 2,
    bisect: bool = True,
    max_steps: int = 0,
    down_steps: int = 3,
    target: float = TARGET,
) -> Generator[float, float, dict]:
    """The highest rate whose attainment is >= target, as a generator: it yields the next rate
    to run, is sent that rate's attainment, and returns the summary (StopIteration.value). Rates
    start * factor^k (3 significant digits) upwards until `fails` in a row miss, or `cap` is
    run, or `max_steps` rates (0: no limit); if none passed, up to `down_steps` rates below
    `start` until one does; then one geometric bisection step between the best passing rate and
    the next failing one above it. A generator, so that several systems' searches can run in
    lockstep, each rate of each system beside the others' (`search_max_rate` drives one)."""
    tried: dict[float, float] = {}

    def room() -> bool:
        return not max_steps or len(tried) < max_steps

    k, missed, stop = 0, 0, "cap"
    while True:
        rate = min(cap, sig3(start * factor**k))
        tried[rate] = yield rate
        missed = 0 if tried[rate] >= target else missed + 1
        if missed >= fails:
            stop = f"{fails} misses in a row"
            break
        if rate >= cap or not room():
            stop = "cap" if rate >= cap else "max_steps"
            break
        k += 1
    if not any(a >= target for a in tried.values()):
        for j in range(1, down_steps + 1):
            if not room():
                break
            rate = sig3(start / factor**j)
            tried[rate] = yield rate
            if tried[rate] >= target:
                break
    best = max((r for r, a in tried.items() if a >= target), default=0.0)
    above = [r for r, a in tried.items() if r > best and a < target]
    bisected = None
    if bisect and best and above and room():
        mid = sig3(math.sqrt(best * min(above)))
        if best < mid < min(above):
            bisected = mid
            tried[mid] = yield mid
            best = mid if tried[mid] >= target else best
    return {
        "max_rate_at_slo90": best,
        "tried": [{"rate": r, "attainment": a} for r, a in tried.items()],
        "stopped": stop,
        "bisected": bisected,
        "lower_bound_only": best >= max(tried),  # no rate above it missed: the limit is higher
    }


def search_max_rate(attain: Callable[[float], float], **options) -> dict:
    """`rate_search` for one system: `attain(rate)` runs a rate and gives its attainment."""
    return drive({"only": rate_search(**options)}, lambda _, rate: attain(rate))["only"]


def rotated(names: list[str], k: int) -> list[str]:
    """`names` starting at its k-th (modulo its length): who goes first in round k."""
    return names[k % len(names) :] + names[: k % len(names)] if names else []


def drive(
    searches: dict[str, Generator[float, float, dict]], attain: Callable[[str, float], float]
) -> dict[str, dict]:
    """Run several searches in lockstep: each round, every search still going runs its next
    rate, in an order that rotates by one each round (so no system always goes first on a
    machine whose speed drifts). Returns each search's summary."""
    done: dict[str, dict] = {}
    pending: dict[str, float] = {}
    for name, gen in searches.items():
        pending[name] = next(gen)
    rnd = 0
    while pending:
        got = {name: attain(name, pending[name]) for name in rotated(list(pending), rnd)}
        for name, att in got.items():
            try:
                pending[name] = searches[name].send(att)
            except StopIteration as end:
                done[name] = end.value
                del pending[name]
        rnd += 1
    return done


def fixed_rates(rates: list[float]) -> Generator[float, float, dict]:
    """Explicit rates as a search (`drive`'s protocol): each runs, the best passing is kept."""
    tried = []
    for rate in rates:
        tried.append({"rate": rate, "attainment": (yield rate)})
    best = max((t["rate"] for t in tried if t["attainment"] >= TARGET), default=0.0)
    return {"explicit": rates, "tried": tried, "max_rate_at_slo90": best}
