"""bench/cluster.py pieces on tiny inputs: the scale measurement and the target read-out."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "cluster.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_cluster", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_cluster"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_scale_measurement_splits_the_time_and_compares_with_the_step_rate(tmp_path) -> None:
    bench = load_bench()
    m = bench.measure_scale(4, 5.0, 3.0, str(tmp_path))  # empty data dir: synthetic lengths
    assert m["workers"] == 4 and m["plans"] > 100
    assert m["plans_per_s"] > 0 and m["needed_plans_per_s"] > 0
    assert m["sustains"] == (m["plans_per_s"] >= m["needed_plans_per_s"])
    assert abs(sum(m["share"].values()) - 1.0) < 0.01
    assert m["placement_us_per_plan"] >= 0


def test_targets_are_read_off_the_answers() -> None:
    bench = load_bench()

    def row(e, d, v):
        return {"ecoserve": {"gpus": e}, "distserve": {"gpus": d}, "vllm": {"gpus": v}}

    summary = {
        "traces": {"a": {"2": row(1, 2, 1), "10": row(3, 4, 3)}, "b": {"5": row(3, 4, 2)}},
        "scale": {"8": {"sustains": True}, "64": {"sustains": False}},
    }
    t = bench.targets(summary)
    assert t["half_of_distserve_on_some_trace"] and t["half_only_at_distserve_floor"]
    assert t["per_trace"]["a"]["rates_at_or_below_half"] == ["2"]
    assert not t["never_more_than_vllm"]
    assert t["per_trace"]["b"]["rates_where_ecoserve_needs_more_than_vllm"] == ["5"]
    assert t["sustained_workers"] == 8
