"""bench/sim.py on a tiny configuration: JSON shape per trace x profile x SLO x policy, skipped
names, the Markdown report.

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
PROFILE = "llama-2-7b_a100-80gb"
METRICS = (
    "max_rate_at_slo90",
    "mean_jct_s",
    "p99_ttft_s",
    "preemptions",
    "preempted_requests",
    "kv_reserved_share",
    "kv_reserved_share_max",
    "kv_used_share",
    "kv_used_share_max",
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
        policies=("ecoserve", "ecoserve-oracle", "vllm", "no-such-policy"),
        traces=("sharegpt", "azure_conv", "no_such_trace"),
        profiles=(PROFILE, "no-such-gpu"),
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
        "format",
        "traces",
        "skipped",
        "setup",
        "mode",
        "n_requests",
        "rl_model",
        "wall_s",
        "machine",
    }
    assert on_disk["mode"] == "quick" and on_disk["n_requests"] == 60
    defs = on_disk["setup"]["slo_definitions"]
    assert set(defs) == {"jct", "ttft-tpot", "two-class"} and defs["jct"]["k"] == 5.0
    assert "DistServe" in defs["ttft-tpot"]["reasoning"]
    assert on_disk["setup"]["profiles"][PROFILE] == "llama-2-7b/a100-80gb"
    assert isinstance(on_disk["wall_s"], float) and on_disk["wall_s"] >= 0
    assert on_disk["machine"]["cpu_count"] >= 1


def test_unregistered_names_are_skipped_with_a_note(result):
    _, summary = result
    skipped = summary["skipped"]
    assert "no-such-policy" in skipped["policies"]
    assert "no-such-gpu" in skipped["profiles"]
    assert "not registered" in skipped["traces"]["no_such_trace"]
    assert set(summary["traces"]["sharegpt"]) == {PROFILE}  # the unknown profile ran nothing


def test_cells_per_slo_and_policy(result):
    _, summary = result
    cell = summary["traces"]["sharegpt"][PROFILE]
    assert "synthetic" in cell["_workload"]
    assert cell["_common_rate"] > 0
    tg = cell["_slo_targets"]
    assert 0 < tg["unloaded_ttft_s"] < tg["ttft_s"] and 0 < tg["unloaded_tpot_s"] < tg["tpot_s"]
    assert tg["two_class"]["batch"]["ttft_s"] > tg["two_class"]["interactive"]["ttft_s"]
    for slo in ("jct", "ttft-tpot", "two-class"):
        t = cell[slo]
        assert [k for k in t if not k.startswith("_")] == ["ecoserve", "ecoserve-oracle", "vllm"]
        for p in ("ecoserve", "ecoserve-oracle", "vllm"):
            for key in METRICS:
                v = t[p][key]
                assert isinstance(v, int | float) and not isinstance(v, bool), (slo, p, key, v)
                assert math.isfinite(v), (slo, p, key, v)
            assert 0 <= t[p]["slo_attainment"] <= 1
            assert t[p]["kv_reserved_share"] <= t[p]["kv_reserved_share_max"] <= 1
        assert set(t["_ratios"]) == {
            "max_rate_ecoserve_over_vllm",
            "max_rate_ecoserve-oracle_over_vllm",
            "max_rate_ecoserve_over_ecoserve-oracle",
            "mean_jct_ecoserve_over_vllm",
        }
        tried = t["_search"]["attainment_by_rate"]
        assert set(tried) == {"ecoserve", "ecoserve-oracle", "vllm"}
        # vLLM's answer under the jct SLO is the common rate.
    assert cell["jct"]["vllm"]["max_rate_at_slo90"] in (0, cell["_common_rate"])
    # vLLM is SLO-blind: the same run at the common rate under every definition.
    assert cell["jct"]["vllm"]["mean_jct_s"] == cell["two-class"]["vllm"]["mean_jct_s"]
    for p in ("ecoserve", "vllm"):
        classes = cell["two-class"][p]["classes"]
        assert set(classes) == {"interactive", "batch"}
        assert sum(c["requests"] for c in classes.values()) == 60
        assert "classes" in cell["two-class"][p]["at_max_rate"]


def test_missing_trace_is_skipped(result):
    _, summary = result
    azure = summary["traces"]["azure_conv"]
    assert set(azure) == {"skipped"}
    assert "not found" in azure["skipped"]


def test_markdown(result):
    out, _ = result
    md = (out / "summary.md").read_text()
    assert "### sharegpt" in md and "### azure_conv" in md
    assert "| ecoserve |" in md and "| vllm |" in md and "| ecoserve-oracle |" in md
    assert "Skipped:" in md and "no-such-policy" in md
    assert "ecoserve/vllm" in md and "ecoserve/ecoserve-oracle" in md
    assert f"| {PROFILE} | two-class |" in md


def test_full_mode_sweep_and_plots(bench, tmp_path):
    cfg = bench.full_config(
        n=40,
        policies=("ecoserve", "vllm"),
        traces=("sharegpt",),
        profiles=(PROFILE,),
        slos=("jct", "two-class"),
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
    sweep = summary["sweep"]["traces"]["sharegpt"]
    assert set(sweep) == {"jct", "two-class"}
    assert set(sweep["jct"]) == {"ecoserve", "vllm"}
    assert len(sweep["jct"]["vllm"]) == len(bench.SWEEP_FACTORS)
    for per_policy in sweep.values():
        for runs in per_policy.values():
            for rate, m in runs.items():
                assert float(rate) > 0 and 0 <= m["slo_attainment"] <= 1
    assert "classes" in next(iter(sweep["two-class"]["vllm"].values()))
    for name in summary["machine"]["plots"]:
        assert (tmp_path / name).stat().st_size > 0
    assert "jct_cdf_sharegpt.png" in summary["machine"]["plots"]
