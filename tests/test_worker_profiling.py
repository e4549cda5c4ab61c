"""Worker self-profiling: timing rows, the token budget knee, cost-model round trip, the bench."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ecoserve_scheduler.sim.cost_model import fit_profile, load_profile, load_timings  # noqa: E402
from ecoserve_worker.model_runner import ModelRunner  # noqa: E402
from ecoserve_worker.profiling import (  # noqa: E402
    build_step,
    profile_runner,
    token_budget,
    write_timings,
)

REPO = Path(__file__).resolve().parents[1]
KEYS = {
    "prefill_tokens",
    "prefill_context_tokens",
    "decode_seqs",
    "decode_context_tokens",
    "latency_s",
}
SMALL_SHAPES = [
    (16, 0, 0, 0),
    (64, 0, 0, 0),
    (128, 0, 0, 0),
    (0, 0, 1, 16),
    (0, 0, 8, 64),
    (32, 0, 4, 32),
    (32, 16, 0, 0),
]


@pytest.fixture(scope="module")
def runner(model_dir):
    return ModelRunner(model_dir, "cpu", torch.float32, num_blocks=256, block_size=16)


@pytest.fixture(scope="module")
def rows(runner):
    return profile_runner(runner, SMALL_SHAPES, repeats=1)


def test_profile_rows_have_timing_format_and_cover_shapes(rows):
    assert len(rows) == len(SMALL_SHAPES)
    for r in rows:
        assert set(r) >= KEYS
        assert r["latency_s"] > 0
    kinds = {r["kind"] for r in rows}
    assert kinds == {"prefill", "decode", "mixed"}
    decode = [r for r in rows if r["kind"] == "decode"]
    assert {(r["decode_seqs"], r["decode_context_tokens"]) for r in decode} == {(1, 16), (8, 512)}
    mixed = next(r for r in rows if r["kind"] == "mixed")
    assert (mixed["prefill_tokens"], mixed["decode_seqs"]) == (32, 4)
    assert mixed["prefill_chunks"] == [[32, 0]]
    chunk = next(r for r in rows if r["prefill_context_tokens"])
    assert chunk["prefill_chunks"] == [[32, 16]]


def test_default_grid_skips_shapes_the_pool_cannot_hold(runner):
    # 256 blocks of 16: 128 decodes at 512 context need 4224 blocks, so they are left out.
    rows = profile_runner(runner, [(0, 0, 128, 512), (16, 0, 0, 0)], repeats=1)
    assert [r["prefill_tokens"] for r in rows] == [16]


def test_build_step_uses_contiguous_disjoint_blocks(runner):
    seqs = build_step(runner, (40, 0, 3, 20))
    tables = [t for *_, t in seqs]
    assert tables[0] == [0, 1, 2]
    assert tables[1:] == [[3, 4], [5, 6], [7, 8]]
    assert [len(tokens) for _, tokens, _, _ in seqs] == [40, 1, 1, 1]
    assert all(start == 20 for _, _, start, _ in seqs[1:])
    # The step really runs on the runner.
    assert len(runner.step(seqs)) == 4


def _law_rows(sizes, knee=256.0, s_tok=2.0**-16, c0=0.0):
    """Rows from a hard roofline: t(T) = c0 + s_tok * max(knee, T) (exact in binary)."""
    return [
        {
            "prefill_tokens": t,
            "prefill_context_tokens": 0,
            "decode_seqs": 0,
            "decode_context_tokens": 0,
            "latency_s": c0 + s_tok * max(knee, t),
        }
        for t in sizes
    ]


def test_token_budget_picks_the_knee_of_a_known_law():
    sizes = [16 * k for k in range(1, 65)]  # 16..1024
    rows = _law_rows(sizes, knee=256.0)
    # Throughput T / (s * max(256, T)) rises until T = 256, then is flat: the knee is 256.
    assert token_budget(rows, fraction=1.0) == 256
    # At 90%, the first size with T / 256 >= 0.9 is 231 -> measured 240 (a multiple of 16).
    assert token_budget(rows, fraction=0.9) == 240
    assert token_budget(rows, fraction=0.5) == 128


def test_token_budget_grows_past_the_knee_to_the_step_target():
    """A flat-throughput machine (knee 64) with a 100 ms step target: the budget is the largest
    measured prefill whose step fits the target; never below the knee."""
    c0, s = 5e-3, 4e-4  # 64 tokens already near peak; 256 tokens take 107 ms
    sizes = [16, 32, 64, 128, 192, 256, 512]
    rows = [{"prefill_tokens": t, "decode_seqs": 0, "latency_s": c0 + s * t} for t in sizes]
    knee = token_budget(rows, fraction=0.9)
    assert knee < 192
    assert token_budget(rows, fraction=0.9, step_target_s=0.1) == 192  # 81.8 ms <= 100 ms
    assert token_budget(rows, fraction=0.9, step_target_s=0.2) == 256  # 512 takes 210 ms
    assert token_budget(rows, fraction=0.9, step_target_s=1e-4) == knee  # nothing fits


class _ClockedRunner:
    """A runner whose step costs `cost(tokens)` seconds of a fake perf_counter."""

    block_size, num_blocks = 16, 4096
    config = type("Config", (), {"vocab_size": 1000, "max_position_embeddings": 4096})

    def __init__(self, cost):
        self.cost, self.now, self.calls = cost, 0.0, 0

    def step(self, seqs):
        self.calls += 1
        self.now += self.cost(sum(len(s[1]) for s in seqs))


def test_start_up_profile_stops_past_the_step_target_and_times_long_steps_once(monkeypatch):
    """Only the prefill sizes up to the first one slower than the target are timed (bigger
    ones would be slower still); a step over LONG_STEP_S is timed once after its warm-up."""
    import time

    from ecoserve_worker import profiling

    r = _ClockedRunner(lambda tokens: 0.002 * tokens)  # 16 -> 32 ms ... 1024 -> 2 s
    monkeypatch.setattr(time, "perf_counter", lambda: r.now)
    rows = profile_runner(r, profiling.budget_shapes(), stop_above_s=0.3)
    assert [row["prefill_tokens"] for row in rows] == [16, 32, 64, 128, 256]  # 256: 0.51 s
    assert [row["latency_s"] for row in rows] == pytest.approx([0.032, 0.064, 0.128, 0.256, 0.512])
    # warm-up + 3 runs for the three short steps; warm-up + 1 for the two over 0.25 s
    assert r.calls == 3 * 4 + 2 * 2
    assert token_budget(rows, step=16, step_target_s=0.3) == 128


def test_token_budget_with_overhead_and_ignored_rows():
    # t = c0 + s*T: tokens/s = T / (c0 + s*T) keeps rising (more slowly) up to 1024, so the
    # budget is the first size within 90% of the rate at 1024 (computed directly here).
    c0, s = 1e-3, 1e-5
    sizes = [16 * k for k in range(1, 65)]
    rows = [
        {"prefill_tokens": t, "decode_seqs": 0, "latency_s": c0 + s * t, "decode_context_tokens": 0}
        for t in sizes
    ]
    tps = {t: t / (c0 + s * t) for t in sizes}
    expect = min(t for t in sizes if tps[t] >= 0.9 * max(tps.values()))
    noise = [
        {"prefill_tokens": 8, "decode_seqs": 4, "latency_s": 1e-9},  # mixed: ignored
        {"prefill_tokens": 8, "prefill_context_tokens": 64, "latency_s": 1e-9},  # chunk: ignored
        {"prefill_tokens": 0, "decode_seqs": 32, "latency_s": 1e-9},  # decode: ignored
    ]
    assert token_budget(rows + noise, fraction=0.9) == expect
    assert token_budget(rows, fraction=0.9, step=1) == expect
    with pytest.raises(ValueError):
        token_budget(noise)


def test_write_timings_loads_and_fits(rows, tmp_path):
    path = write_timings(rows, tmp_path / "t" / "timings.jsonl")
    loaded = load_timings(path)
    assert len(loaded) == len(rows)
    for a, b in zip(loaded, rows, strict=True):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}
    fitted = fit_profile(load_profile("llama-2-7b/a100-80gb"), path, source="tiny worker profile")
    assert fitted.fit_rel_error is not None
    assert fitted.s_tok >= 0 and fitted.c0 >= 0


def test_bench_core_writes_summary(model_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_worker", REPO / "bench" / "worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "worker"
    summary = mod.run_bench(
        out,
        model_dir,
        batches=(1, 8, 32, 128),
        prompt_len=8,
        decode_steps=2,
        prefill_prompts=2,
        prefill_len=16,
        repeats=1,
        decode_runs=1,
        warmup=False,
        zmq_iters=5,
        profile_shapes=[(16, 0, 0, 0), (32, 0, 0, 0), (0, 0, 2, 16), (16, 0, 2, 16)],
        profile_repeats=1,
        log=lambda *_: None,
    )
    data = json.loads((out / "summary.json").read_text())
    assert data == json.loads(json.dumps(summary))
    for side in ("ecoserve", "transformers"):
        for key in (
            "decode_tok_s_b1",
            "decode_tok_s_b8",
            "decode_tok_s_b32",
            "decode_tok_s_b128",
            "prefill_tok_s",
        ):
            assert data[side][key] > 0
    assert data["zmq_roundtrip_share_b32"] > 0
    assert data["speedup_b32"] > 0
    mixed = data["decode_mixed_ctx_b32"]
    assert mixed["step_s_grouped"] > 0 and mixed["step_s_padded"] > 0
    assert mixed["contexts_max"] > 2 * mixed["contexts_mean"]  # unequal rows, as intended
    assert data["machine"]["torch_threads"] >= 1
    assert data["model"]["hidden_size"] == 64
    assert data["token_budget"] in (16, 32)
    assert len(load_timings(out / "timings.jsonl")) == 4


def test_start_up_profile_is_reused_only_with_the_same_key(
    runner, model_dir, tmp_path, monkeypatch
):
    """The second start of the same model and settings reads the kept profile instead of
    timing again; other settings (threads) profile anew. A corrupt file profiles again."""
    from ecoserve_worker import __main__ as cli
    from ecoserve_worker import profile_cache, profiling

    monkeypatch.setenv("ECOSERVE_PROFILE_CACHE", str(tmp_path))
    calls = []

    def fake_profile(r, shapes=None, repeats=3, stop_above_s=None):
        calls.append(torch.get_num_threads())
        return profile_runner(r, SMALL_SHAPES, repeats=1)

    monkeypatch.setattr(profiling, "profile_runner", fake_profile)
    first = cli.profile_at_start(runner, None, None, model_dir)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    assert cli.profile_at_start(runner, None, None, model_dir) == first
    assert len(calls) == 1  # reused
    cli.profile_at_start(runner, None, None, model_dir, use_cache=False)
    assert len(calls) == 2  # --no-profile-cache
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        cli.profile_at_start(runner, None, None, model_dir)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.json"))) == 2
    for f in tmp_path.glob("*.json"):
        f.write_text("{not json")
    key = profile_cache.profile_key(runner, model_dir, threads, profiling.default_shapes())
    assert profile_cache.load(key) is None
    cli.profile_at_start(runner, None, None, model_dir)
    assert len(calls) == 4
    cli.profile_at_start(runner, None, None, model_dir, step_target_s=0.5)
    assert len(calls) == 5  # another cut of the prefill sizes: another profile
