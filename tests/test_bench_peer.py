"""bench/peer_measure.py, what bench/peer_vllm.py measures with, without a vLLM and without a
model (the summary and the report: tests/test_bench_peer_report.py).

The peer run itself needs vLLM's own venv and minutes of CPU (`make bench-peer`); these tests
pin what turns its raw observations into the numbers the report states: the chat stream parser
(against httpx's MockTransport), the load shapes, the per-token CPU and the rate search (with a
made-up attainment curve).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path

import httpx
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def measure():
    return _load("peer_measure")


def test_kv_usage_reads_both_servers_metrics(measure):
    ecoserve = (
        'ecoserve_kv_blocks{state="used",worker="w0"} 30.0\n'
        'ecoserve_kv_blocks{state="total",worker="w0"} 128.0\n'
        'ecoserve_kv_blocks{state="used",worker="w1"} 34.0\n'
        'ecoserve_kv_blocks{state="total",worker="w1"} 128.0\n'
    )
    assert measure.kv_usage(ecoserve) == pytest.approx(64 / 256)
    vllm = (
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.375\n'
    )
    assert measure.kv_usage(vllm) == pytest.approx(0.375)
    assert measure.kv_usage("other_metric 1.0\n") is None


def test_cpu_seconds_counts_children(measure):
    """vLLM's engine core is a child of the API server: its CPU must be counted. The parent
    here only starts Python and waits; its child burns 0.4 s of CPU and stays alive."""
    import subprocess
    import time

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
    child = [sys.executable, "-c", burn + "time.sleep(60)"]
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess; subprocess.run({child!r})"]
    )
    try:
        deadline = time.monotonic() + 20
        while measure.cpu_seconds(parent.pid) < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for the burn to happen, not timing it
        assert measure.cpu_seconds(parent.pid) >= 0.4
        # Named on its own (EcoServe's engine core), the child is left out of its parent's.
        (kid,) = measure.children(parent.pid)
        procs = {"front": (parent.pid, False), "core": kid}
        while measure.process_cpu(procs)["core"] < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        split = measure.process_cpu(procs)
        assert split["core"] >= 0.4 and split["front"] < 0.4
    finally:
        for p in Path(f"/proc/{parent.pid}/task").glob("*/children"):
            for pid in p.read_text().split():
                os.kill(int(pid), 9)
        parent.kill()
        parent.wait()


# ---- the chat client -----------------------------------------------------------------------


def _sse(*chunks) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def _delta(content, finish=None, usage=None) -> dict:
    chunk = {"choices": [{"delta": {"content": content}, "finish_reason": finish}]}
    return {**chunk, "usage": usage} if usage else chunk


ITEM = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "prompt_tokens": 9}
VLLM_STREAM = _sse(  # a role-only first chunk, then content; usage alone at the end
    {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    _delta("a"),
    _delta("b"),
    _delta("c"),
    _delta("d", "length"),
    {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
)
ECOSERVE_STREAM = _sse(  # usage on the chunk that finishes; one token here had no text
    _delta("a"), _delta("b"), _delta("cd", "length", {"completion_tokens": 4})
)


def _chat(measure, handler, item=ITEM) -> dict:
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await measure.chat_stream(client, "http://x/v1/chat/completions", "m", item)

    return asyncio.run(go())


@pytest.mark.parametrize("stream", [VLLM_STREAM, ECOSERVE_STREAM], ids=["vllm", "ecoserve"])
def test_chat_stream_counts_usage_tokens_and_times_first_content(measure, stream):
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, json.loads(request.content)))
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    r = _chat(measure, handler)
    assert r["ok"] and r["tokens"] == 4
    assert 0 < r["ttft_s"] <= r["jct_s"]
    assert r["tpot_s"] == pytest.approx((r["jct_s"] - r["ttft_s"]) / 3)
    path, body = sent[0]
    assert path == "/v1/chat/completions"
    assert body["messages"] == ITEM["messages"] and body["max_tokens"] == 4
    assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0
    assert body["stream_options"] == {"include_usage": True}


def test_chat_stream_without_usage_counts_chunks_and_reports_errors(measure):
    plain = _sse(_delta("a"), _delta("b", "stop"))
    r = _chat(measure, lambda _: httpx.Response(200, content=plain))
    assert r["ok"] and r["tokens"] == 2
    r = _chat(measure, lambda _: httpx.Response(400, json={"error": "bad"}))
    assert not r["ok"] and r["error"].startswith("HTTP 400")
    err = _sse({"error": {"message": "timeout"}})
    assert "timeout" in _chat(measure, lambda _: httpx.Response(200, content=err))["error"]


def test_closed_loop_keeps_n_streams_busy_and_sends_each_item_once(measure):
    seen, live, peak = [], [0], [0]

    async def handler(request: httpx.Request) -> httpx.Response:
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        await asyncio.sleep(0.01)
        live[0] -= 1
        seen.append(json.loads(request.content)["max_tokens"])
        return httpx.Response(200, content=_sse(_delta("x", "length", {"completion_tokens": 1})))

    items = [{**ITEM, "max_tokens": i} for i in range(10)]
    real = httpx.AsyncClient
    transport = httpx.MockTransport(handler)
    patched = lambda **kw: real(transport=transport, **kw)  # noqa: E731
    measure.httpx.AsyncClient, saved = patched, measure.httpx.AsyncClient
    try:
        out, elapsed = asyncio.run(measure.closed_loop("http://x", "m", items, 3))
    finally:
        measure.httpx.AsyncClient = saved
    assert sorted(seen) == list(range(10)) and peak[0] == 3
    assert all(r["ok"] for r in out) and elapsed > 0


def test_poisson_arrivals_are_seeded_and_have_the_rate(measure):
    a = measure.arrivals(2000, 4.0, seed=7)
    assert a == measure.arrivals(2000, 4.0, seed=7) and a[0] == 0.0
    assert a[-1] / 1999 == pytest.approx(0.25, rel=0.1)


def test_each_rate_draws_the_same_prompts_for_every_system(measure):
    pool = list(range(1000))
    one = measure.rate_items(pool, 40, 1.12, seed=0)
    assert one == measure.rate_items(pool, 40, 1.12, seed=0) and len(set(one)) == 40
    assert len(set(one) & set(measure.rate_items(pool, 40, 1.69, seed=0))) < 10


def test_a_rate_offers_its_seconds_of_arrivals_and_at_least_n(measure):
    assert measure.requests_at(4.0, 60, 60) == 240  # a minute at 4 req/s
    assert measure.requests_at(0.5, 60, 60) == 60  # never fewer than n
    assert measure.requests_at(7.0, 8, 0) == 8  # seconds 0: n alone (--quick)


def test_single_stream_takes_medians(measure):
    rs = [
        {"ok": True, "tokens": 11, "ttft_s": t, "tpot_s": p, "jct_s": 9}
        for t, p in ((0.1, 0.05), (0.3, 0.1), (0.2, 0.02))
    ]
    rs.append({"ok": False, "error": "x"})
    s = measure.single_stream(rs)
    assert s["decode_tok_s_p50"] == pytest.approx(20.0) and s["ttft_p50_s"] == 0.2
    assert s["measured"] == 3 and s["requests"] == 4


def test_metrics_give_cpu_seconds_per_token(measure):
    rs = [{"ok": True, "tokens": 50, "ttft_s": 0.5, "tpot_s": 0.1, "jct_s": 5.4}] * 2
    rs.append({"ok": True, "tokens": 100, "ttft_s": 3.0, "tpot_s": 0.1, "jct_s": 13})
    m = measure.metrics(rs, 10.0, {"ttft_s": 2.0, "tpot_s": 0.2}, {"w": 1.0, "s": 3.0}, 0.5)
    assert m["output_tokens"] == 200 and m["throughput_tok_s"] == 20.0
    assert m["slo_attainment"] == pytest.approx(2 / 3)  # the 3 s TTFT misses
    assert m["cpu_s_per_token"] == {"w": 0.005, "s": 0.015, "server_total": 0.02}
    assert m["cpu_s"]["load-generator"] == 0.5


# ---- the rate search -----------------------------------------------------------------------


def _knee(at: float):
    calls = []

    def attain(rate: float) -> float:
        calls.append(rate)
        return 1.0 if rate <= at else 0.5

    return attain, calls


def test_search_climbs_until_two_misses_then_bisects(measure):
    attain, calls = _knee(2.2)
    got = measure.search_max_rate(attain)
    assert calls == [0.5, 0.75, 1.12, 1.69, 2.53, 3.8, 2.07]  # sqrt(1.69 * 2.53) = 2.07
    assert got["max_rate_at_slo90"] == 2.07 and got["bisected"] == 2.07
    assert got["stopped"] == "2 misses in a row" and not got["lower_bound_only"]
    attain, calls = _knee(2.0)
    assert measure.search_max_rate(attain)["max_rate_at_slo90"] == 1.69  # 2.07 missed


def test_search_survives_one_noisy_miss(measure):
    curve = {0.5: 1.0, 0.75: 0.85, 1.12: 0.95, 1.69: 0.5, 2.53: 0.4}
    got = measure.search_max_rate(curve.__getitem__, bisect=False)
    assert [t["rate"] for t in got["tried"]] == list(curve)
    assert got["max_rate_at_slo90"] == 1.12


def test_search_stops_at_the_cap_and_says_it_is_a_lower_bound(measure):
    attain, calls = _knee(100.0)
    got = measure.search_max_rate(attain, cap=16.0)
    assert calls[-1] == 16.0 and got["max_rate_at_slo90"] == 16.0
    assert got["lower_bound_only"] and got["stopped"] == "cap"


def test_search_goes_below_start_when_nothing_passes(measure):
    attain, calls = _knee(0.25)
    got = measure.search_max_rate(attain, bisect=False)
    assert calls == [0.5, 0.75, 0.333, 0.222]
    assert got["max_rate_at_slo90"] == 0.222
    attain, calls = _knee(0.01)
    assert measure.search_max_rate(attain)["max_rate_at_slo90"] == 0.0


def test_search_respects_max_steps(measure):
    attain, calls = _knee(100.0)
    got = measure.search_max_rate(attain, max_steps=3)
    assert calls == [0.5, 0.75, 1.12] and got["stopped"] == "max_steps"
    assert got["max_rate_at_slo90"] == 1.12 and got["lower_bound_only"]


def test_searches_in_lockstep_rotate_who_goes_first_and_end_on_their_own(measure):
    """Every round each search still going runs its next rate; the order rotates by one a
    round; a search that ends (two misses) leaves while the others go on."""
    knees = {"a": 1.0, "b": 3.0}
    calls: list[tuple[str, float]] = []

    def attain(name: str, rate: float) -> float:
        calls.append((name, rate))
        return 1.0 if rate <= knees[name] else 0.0

    got = measure.drive({n: measure.rate_search(bisect=False) for n in knees}, attain)
    assert calls[:4] == [("a", 0.5), ("b", 0.5), ("b", 0.75), ("a", 0.75)]
    assert [r for n, r in calls if n == "a"] == [0.5, 0.75, 1.12, 1.69]
    assert [r for n, r in calls if n == "b"] == [0.5, 0.75, 1.12, 1.69, 2.53, 3.8, 5.7]
    assert got["a"]["max_rate_at_slo90"] == 0.75 and got["b"]["max_rate_at_slo90"] == 2.53
    assert got == {n: measure.search_max_rate(lambda r, n=n: attain(n, r), bisect=False)
                   for n in knees}  # fmt: skip


def test_fixed_rates_run_each_given_rate_and_keep_the_best_passing(measure):
    got = measure.drive({"x": measure.fixed_rates([4.0, 2.0, 8.0])}, lambda _, r: r <= 4.0)
    assert [t["rate"] for t in got["x"]["tried"]] == [4.0, 2.0, 8.0]
    assert got["x"]["max_rate_at_slo90"] == 4.0


def test_worker_settings_read_from_the_workers_start_up_line():
    servers = _load("peer_servers")
    log = (
        "INFO ecoserve_worker: model m (/x), device cpu, dtype bfloat16, quantization int4, "
        "1 torch threads; KV pool 8192 tokens\nINFO ecoserve_worker: ... token budget 512\n"
    )
    got = servers.worker_settings(log)
    assert got == {"dtype": "bfloat16", "threads": 1, "quantization": "int4", "token_budget": 512}
    old = "dtype float32, 2 torch threads; KV pool"  # before --quantization existed
    assert servers.worker_settings(old) == {"dtype": "float32", "threads": 2}
