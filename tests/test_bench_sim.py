"""bench/sim.py on a tiny configuration: JSON shape, skipped traces, the Markdown report.

Runs without ../shared/data: the data folder is an empty tmp dir, so "sharegpt" falls back to
synthetic ShareGPT-like lengths and "azure_conv" is skipped with a reason.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "sim.py"
METRICS = (
    "max_rate_at_slo90",
    "mean_jct_s",
    "p99_ttft_s",
    "preemptions",
    "sched_us_per_iter_p99",
    "slo_attainment",
    "throughput_rps",
    "output_tok_s",
    "goodput_rps",
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sim", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_sim"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def result(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    empty = tmp_path_factory.mktemp("nodata")
    cfg = bench.quick_config(
        n=60,
        policies=("ecoserve", "vllm"),
        traces=("sharegpt", "azure_conv"),
        data_dir=str(empty),
        jobs=1,
        lo=2.0,
        hi=8.0,  # 60 requests hardly queue: cap the doubling
        rel_tol=0.25,
        progress=False,
    )
    summary = bench.run_bench(cfg, out)
    return out, summary


def test_json_shape(result):
    out, summary = result
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert set(on_disk) == {
        "traces",
        "slo",
        "profile",
        "mode",
        "n_requests",
        "rl_model",
        "wall_s",
        "machine",
    }
    assert on_disk["mode"] == "quick"
    assert on_disk["n_requests"] == 60
    assert on_disk["profile"] == "llama-2-7b/a100-80gb"
    assert on_disk["slo"]["kind"] == "jct" and on_disk["slo"]["k"] > 0
    assert isinstance(on_disk["wall_s"], float) and on_disk["wall_s"] >= 0
    assert on_disk["machine"]["cpu_count"] >= 1


def test_policies_and_metrics(result):
    _, summary = result
    t = summary["traces"]["sharegpt"]
    assert "synthetic" in t["_workload"]
    assert t["_common_rate"] > 0
    policies = [k for k in t if not k.startswith("_")]
    assert policies == ["ecoserve", "vllm"]
    for p in policies:
        for key in METRICS:
            v = t[p][key]
            assert isinstance(v, int | float) and not isinstance(v, bool), (p, key, v)
            assert math.isfinite(v), (p, key, v)
        assert t[p]["max_rate_at_slo90"] >= 0
        assert 0 <= t[p]["slo_attainment"] <= 1
    assert t["vllm"]["max_rate_at_slo90"] in (0, t["_common_rate"])
    ratios = t["_ratios"]
    assert set(ratios) == {"max_rate_ecoserve_over_vllm", "mean_jct_ecoserve_over_vllm"}


def test_missing_trace_is_skipped(result):
    _, summary = result
    azure = summary["traces"]["azure_conv"]
    assert set(azure) == {"skipped"}
    assert "not found" in azure["skipped"]


def test_markdown(result):
    out, _ = result
    md = (out / "summary.md").read_text()
    assert "## sharegpt" in md and "## azure_conv" in md
    assert "| ecoserve |" in md and "| vllm |" in md
    assert "Skipped:" in md
    assert "ecoserve/vllm" in md


def test_full_mode_sweep_and_plots(bench, tmp_path):
    cfg = bench.full_config(
        n=40,
        policies=("ecoserve", "vllm"),
        traces=("sharegpt",),
        data_dir=str(tmp_path / "nodata"),
        jobs=1,
        lo=2.0,
        hi=4.0,
        rel_tol=0.5,
        ablation=False,
        progress=False,
    )
    summary = bench.run_bench(cfg, tmp_path)
    assert summary["mode"] == "full"
    sweep = summary["sweep"]["sharegpt"]
    assert set(sweep) == {"ecoserve", "vllm"}
    assert len(sweep["vllm"]) == len(bench.SWEEP_FACTORS)
    for runs in sweep.values():
        for rate, m in runs.items():
            assert float(rate) > 0 and 0 <= m["slo_attainment"] <= 1
    for name in summary["machine"]["plots"]:
        assert (tmp_path / name).stat().st_size > 0
    assert "jct_cdf_sharegpt.png" in summary["machine"]["plots"]
