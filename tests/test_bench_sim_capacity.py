"""bench/sim_capacity.py: the saturated-throughput ceiling set beside bench-sim's max rates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ecoserve_scheduler.sim.sweep import Scenario

BENCH = Path(__file__).resolve().parent.parent / "bench" / "sim_capacity.py"


@pytest.fixture(scope="module")
def cap():
    spec = importlib.util.spec_from_file_location("bench_sim_capacity", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_compare_each_goal_with_the_best_capacity(cap):
    summary = {
        "traces": {
            "t": {
                "p": {
                    "_common_rate": 4.0,
                    "jct": {
                        "vllm": {"max_rate_at_slo90": 4.0},
                        "vllm-v0": {"max_rate_at_slo90": 2.0},
                        "ecoserve": {"max_rate_at_slo90": 4.4},
                    },
                },
                "q": {"jct": {"vllm": {"max_rate_at_slo90": 1.0}}},  # no capacity: left out
            }
        }
    }
    caps = {"t": {"p": {"vllm": {"throughput_rps": 4.5}, "ecoserve": {"throughput_rps": 5.0}}}}
    (row,) = cap.ceiling_rows(summary, caps)
    assert row["capacity_rps"] == 5.0  # the best policy's
    assert row["goal_vs_vllm_over_capacity"] == pytest.approx(1.3 * 4.0 / 5.0, abs=1e-3)
    assert row["goal_vs_vllm-v0_over_capacity"] == pytest.approx(3 * 2.0 / 5.0, abs=1e-3)
    assert row["vllm_share_of_capacity"] == 0.8
    assert "| t | p | jct | 5.00 | 4.00 | 0.80 | 4.40 | 1.04 | 1.20 |" in cap.markdown([row])


def test_a_saturated_run_serves_everything_and_reports_its_throughput(cap):
    sc = Scenario(trace="synthetic", n=60, data_dir=None)
    out = cap.capacity(sc, policies=("vllm", "ecoserve"))
    for policy in ("vllm", "ecoserve"):
        assert out[policy]["throughput_rps"] > 0 and out[policy]["output_tok_s"] > 0
    # Served at a saturating rate, a policy's throughput is far below the offered rate.
    assert out["vllm"]["throughput_rps"] < cap.SATURATING / 10
