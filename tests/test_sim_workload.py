"""Tests of the simulator's workloads: trace format, arrival processes, real-data loaders.

Tests of the real loaders skip when ../shared/data (or $ECOSERVE_DATA_DIR) lacks the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ecoserve_scheduler.sim import workload as w
from ecoserve_scheduler.sim.workload import (
    DataMissing,
    TraceRecord,
    build_workload,
    cap_lengths,
    load_trace_file,
    save_trace_file,
)


def need(filename: str) -> Path:
    """The data file's folder, or skip the test with a message saying what is absent."""
    folder = w.data_dir()
    if not (folder / filename).is_file():
        pytest.skip(f"../shared/data absent: {folder / filename} not found")
    return folder


# ---- data folder and context capping ----


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("ECOSERVE_DATA_DIR", raising=False)
    assert w.data_dir() == Path("../shared/data")
    monkeypatch.setenv("ECOSERVE_DATA_DIR", str(tmp_path))
    assert w.data_dir() == tmp_path
    assert w.data_dir("/x/y") == Path("/x/y")


def test_cap_lengths_invariant():
    for max_context in (2, 3, 16, 512, 4096):
        for inp in (1, 2, 7, max_context // 2, max_context - 1, max_context, 5 * max_context):
            for out in (1, 3, max_context // 2, max_context - 1, max_context, 9 * max_context):
                p, o = cap_lengths(inp, out, max_context)
                assert p >= 1 and o >= 1 and p + o <= max_context
                assert p <= inp and o <= out
                if inp + out <= max_context:
                    assert (p, o) == (inp, out)
                if o < out:  # the output is only cut when it is long and the input leaves no room
                    assert out > max_context // 2 and out > max_context - inp
    assert cap_lengths(5000, 300, 4096) == (3796, 300)  # input truncated first
    assert cap_lengths(100, 5000, 4096) == (100, 3996)  # short input kept whole
    with pytest.raises(ValueError):
        cap_lengths(1, 1, 1)


def test_missing_file_raises_data_missing(tmp_path):
    with pytest.raises(DataMissing, match="sharegpt_v3_pairs.jsonl.gz"):
        w.load_sharegpt(tmp_path, 10, 0)
    with pytest.raises(DataMissing, match="AzureLLMInferenceTrace_conv.csv"):
        w.load_azure_conv(tmp_path)
    with pytest.raises(DataMissing, match="alpaca_vicuna7b"):
        w.load_alpaca_lengths(tmp_path)
    assert issubclass(DataMissing, FileNotFoundError)


# ---- arrival processes ----


def test_poisson_arrivals_rate_and_shape():
    t = w.poisson_arrivals(200_000, 5.0, np.random.default_rng(0))
    assert len(t) == 200_000 and t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert (len(t) - 1) / t[-1] == pytest.approx(5.0, rel=0.02)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.02)


def test_gamma_arrivals_rate_and_burstiness():
    t = w.gamma_arrivals(200_000, 3.0, 2.5, np.random.default_rng(1))
    gaps = np.diff(t)
    assert (len(t) - 1) / t[-1] == pytest.approx(3.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(2.5, rel=0.05)
    with pytest.raises(ValueError):
        w.gamma_arrivals(10, 0.0, 2.0, np.random.default_rng(0))


def test_arrivals_seeded():
    a = w.gamma_arrivals(1000, 2.0, 2.0, np.random.default_rng(7))
    b = w.gamma_arrivals(1000, 2.0, 2.0, np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert len(w.poisson_arrivals(1, 1.0, np.random.default_rng(0))) == 1


# ---- synthetic workload ----


def test_synthetic_matches_sharegpt_stats():
    samples = w.synthetic_sharegpt_like(200_000, np.random.default_rng(3))
    inp = np.array([s.prompt_tokens for s in samples])
    out = np.array([s.output_tokens for s in samples])
    assert out.mean() == pytest.approx(279.8, rel=0.02)
    assert np.median(out) == pytest.approx(255, rel=0.02)
    assert np.percentile(out, 90) == pytest.approx(548, rel=0.02)
    assert np.percentile(out, 99) == pytest.approx(769, rel=0.02)
    assert inp.mean() == pytest.approx(797, rel=0.03)  # README: history 711 + prompt 85.4
    assert np.median(inp) == pytest.approx(724, rel=0.02)
    assert inp.min() >= 1 and out.min() >= 1


def test_build_synthetic_seeded_and_capped():
    a, src = build_workload("synthetic", 2.0, 3000, seed=11, max_context=1024)
    b, _ = build_workload("synthetic", 2.0, 3000, seed=11, max_context=1024)
    c, _ = build_workload("synthetic", 2.0, 3000, seed=12, max_context=1024)
    assert a == b and a != c
    assert "synthetic" in src and "poisson" in src
    assert all(r.prompt_tokens + r.output_tokens <= 1024 for r in a)
    assert all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in a)
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)
    assert w.mean_rate(a) == pytest.approx(2.0, rel=0.1)


def test_rate_sweep_keeps_lengths():
    slow, _ = build_workload("synthetic", 1.0, 500, seed=5)
    fast, src = build_workload("synthetic", 8.0, 500, seed=5, arrival="gamma", cv=3.0)
    assert [r.output_tokens for r in slow] == [r.output_tokens for r in fast]
    assert "gamma" in src
    with pytest.raises(ValueError):
        build_workload("synthetic", 1.0, 10, seed=0, arrival="uniform")
    with pytest.raises(ValueError):
        build_workload("nope", 1.0, 10, seed=0)


def test_sharegpt_fallback(tmp_path):
    with pytest.raises(DataMissing):
        build_workload("sharegpt", 2.0, 100, seed=0, data_dir=tmp_path)
    records, src = build_workload("sharegpt", 2.0, 100, seed=0, data_dir=tmp_path, fallback=True)
    assert len(records) == 100
    assert src.startswith(f"synthetic (ShareGPT-like lengths; {tmp_path} absent)")
    synthetic, _ = build_workload("synthetic", 2.0, 100, seed=0)
    assert records == synthetic


# ---- user trace files ----

RECORDS = [
    TraceRecord(0.0, 12, 30),
    TraceRecord(0.1 + 0.2, 5, 7, slo_jct_s=2.5, prompt_text='say "hi",\nthen bye; ünïcode'),
    TraceRecord(1.0 / 3.0, 1, 1, alpaca_row=0),
]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_trace_file_round_trip(tmp_path, suffix):
    path = tmp_path / f"trace{suffix}"
    save_trace_file(RECORDS, path)
    assert load_trace_file(path) == sorted(RECORDS, key=lambda r: r.arrival_s)


def test_trace_file_csv_minimal_columns_and_sorting(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\r\n2.0,10,20\r\n1.0,3,4.0\r\n")
    assert load_trace_file(path) == [TraceRecord(1.0, 3, 4), TraceRecord(2.0, 10, 20)]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("-1,10,20", "arrival_s"),
        ("1.0,0,20", "prompt_tokens"),
        ("1.0,10,2.5", "output_tokens"),
        ("1.0,abc,20", "could not convert"),
        ("1.0,,20", "missing prompt_tokens"),
    ],
)
def test_trace_file_bad_csv_row_names_line(tmp_path, row, message):
    path = tmp_path / "bad.csv"
    path.write_text(f"arrival_s,prompt_tokens,output_tokens\n0,1,1\n{row}\n")
    with pytest.raises(ValueError, match=f"line 3: bad trace row: .*{message}"):
        load_trace_file(path)


def test_trace_file_bad_header_and_jsonl(tmp_path):
    csv_path = tmp_path / "hdr.csv"
    csv_path.write_text("time,prompt_tokens,output_tokens\n0,1,1\n")
    with pytest.raises(ValueError, match="line 1: .*arrival_s"):
        load_trace_file(csv_path)
    good = json.dumps({"arrival_s": 0, "prompt_tokens": 1, "output_tokens": 1})
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(f"{good}\n\n{{not json\n")
    with pytest.raises(ValueError, match="line 3: bad JSON"):
        load_trace_file(jsonl)
    jsonl.write_text(
        f'{good}\n{{"arrival_s": 1, "prompt_tokens": 2, "output_tokens": 1, "slo_jct_s": -1}}\n'
    )
    with pytest.raises(ValueError, match="line 2: .*slo_jct_s"):
        load_trace_file(jsonl)


# ---- real data (skips when ../shared/data is absent) ----


def test_parse_timestamp_seven_digits():
    (t0, f0), (t1, f1) = (
        w._parse_timestamp(s)
        for s in ("2023-11-16 18:15:46.6805900", "2023-11-16 18:15:50.9951690\r")
    )
    assert (t1 - t0).total_seconds() + f1 - f0 == pytest.approx(4.314579, abs=1e-9)
    assert w._parse_timestamp("2023-11-16 18:15:46")[1] == 0.0


def test_azure_conv_loader():
    folder = need(w.AZURE_CONV_FILE)
    records = w.load_azure_conv(folder, max_context=10**9)
    assert len(records) == 19_366
    assert records[0].arrival_s == 0.0
    assert records[-1].arrival_s == pytest.approx(3501.72, abs=0.01)
    assert w.mean_rate(records) == pytest.approx(5.53, abs=0.01)
    assert np.mean([r.output_tokens for r in records]) == pytest.approx(211.1, abs=0.05)
    assert np.all(np.diff([r.arrival_s for r in records]) >= 0)
    fast = w.load_azure_conv(folder, max_context=10**9, time_scale=2.0)
    assert w.mean_rate(fast) == pytest.approx(2 * w.mean_rate(records), rel=1e-9)
    assert [r.prompt_tokens for r in fast] == [r.prompt_tokens for r in records]


def test_azure_conv_capping_limit_offset():
    folder = need(w.AZURE_CONV_FILE)
    raw = w.load_azure_conv(folder, max_context=10**9)
    capped = w.load_azure_conv(folder, max_context=4096)
    assert any(r.prompt_tokens + r.output_tokens > 4096 for r in raw)
    for r, c in zip(raw, capped, strict=True):
        assert c.prompt_tokens + c.output_tokens <= 4096 and c.prompt_tokens >= 1
        if r.prompt_tokens + r.output_tokens <= 4096:
            assert c == r
    window = w.load_azure_conv(folder, limit=100, start_offset_s=600.0)
    assert len(window) == 100 and 0 <= window[0].arrival_s < 5


def test_build_azure_conv_rate():
    need(w.AZURE_CONV_FILE)
    records, src = build_workload("azure_conv", 12.0, 2000, seed=0)
    assert len(records) == 2000 and "azure_conv" in src
    assert w.mean_rate(records) == pytest.approx(12.0, rel=1e-9)
    real, src = build_workload("azure_conv", None, None, seed=0)
    assert len(real) == 19_366 and "real timestamps" in src


def test_sharegpt_loader():
    folder = need(w.SHAREGPT_FILE)
    a = w.load_sharegpt(folder, 3000, rng_seed=4)
    assert a == w.load_sharegpt(folder, 3000, rng_seed=4)
    assert a != w.load_sharegpt(folder, 3000, rng_seed=5)
    inp = np.array([s.prompt_tokens for s in a])
    out = np.array([s.output_tokens for s in a])
    assert inp.mean() == pytest.approx(790, rel=0.08)
    assert out.mean() == pytest.approx(279.8, rel=0.08)
    assert all(isinstance(s.prompt_text, str) and s.prompt_text for s in a)
    prompt_only = w.load_sharegpt(folder, 3000, rng_seed=4, input_mode="prompt")
    assert np.median([s.prompt_tokens for s in prompt_only]) < 50
    small = w.load_sharegpt(folder, 3000, rng_seed=4, max_context=256)
    assert all(s.prompt_tokens >= 1 and s.output_tokens >= 1 for s in small)
    assert all(s.prompt_tokens + s.output_tokens <= 256 for s in small)


def test_sharegpt_without_replacement_and_cached():
    folder = need(w.SHAREGPT_FILE)
    w.load_sharegpt(folder, 10, 0)
    hits = w._sharegpt_columns.cache_info().hits
    prompt, history, response, _ = w._sharegpt_columns(folder / w.SHAREGPT_FILE)
    assert w._sharegpt_columns.cache_info().hits == hits + 1
    everything = w.load_sharegpt(folder, len(response), 1, max_context=10**9)
    assert sorted(s.output_tokens for s in everything) == sorted(response.tolist())
    assert sorted(s.prompt_tokens for s in everything) == sorted((prompt + history).tolist())


def test_build_sharegpt():
    need(w.SHAREGPT_FILE)
    records, src = build_workload("sharegpt", 3.0, 500, seed=2, arrival="gamma", cv=2.0)
    assert src.startswith("sharegpt (") and "gamma" in src
    assert records == build_workload("sharegpt", 3.0, 500, seed=2, arrival="gamma", cv=2.0)[0]
    assert all(r.prompt_text for r in records)


def test_alpaca_lengths_and_workload():
    folder = need(w.ALPACA_FILE)
    data = w.load_alpaca_lengths(folder)
    assert len(data) == 20_000
    assert data["len_t0.0"].mean() == pytest.approx(124.5, abs=0.05)
    assert data["len_t0.7"].mean() == pytest.approx(125.6, abs=0.05)
    assert data["len_alpaca_ref"].max() == 826
    records, src = build_workload("alpaca", 4.0, 5000, seed=3)
    assert "len_t0.7" in src and "ShareGPT" in src
    rows = [r.alpaca_row for r in records]
    assert len(set(rows)) == len(rows)  # drawn without replacement
    assert all(r.output_tokens == data["len_t0.7"][r.alpaca_row] for r in records)
    assert records == build_workload("alpaca", 4.0, 5000, seed=3)[0]
