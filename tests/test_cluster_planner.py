"""Capacity planner: a measured minimum of GPUs per system, and `ecoserve plan`."""

from __future__ import annotations

import json

import pytest

from ecoserve_scheduler.cli import main as cli_main
from ecoserve_scheduler.sim import planner

# Synthetic ShareGPT-like lengths (no data dir needed); ~5 req/s saturate one 7B/A100 GPU.
PLAN = planner.Plan(trace="synthetic", n=150, max_gpus=6)
RATE = 12.0


@pytest.mark.parametrize(
    ("system", "rate"), [("ecoserve", RATE), ("vllm", RATE), ("distserve", 24)]
)
def test_planner_finds_a_minimum(system: str, rate: float) -> None:
    ans = planner.min_gpus(PLAN, system, rate)
    assert ans.gpus is not None and ans.gpus >= 2
    assert ans.attainment >= PLAN.target
    assert ans.attainment_below is not None and ans.attainment_below < PLAN.target
    tried = {(g, split): att for g, split, att in ans.tried}
    assert all(att < PLAN.target for (g, _), att in tried.items() if g < ans.gpus)
    if system == "distserve":
        p, d = map(int, ans.split.split(":"))
        assert p >= 1 and d >= 1 and p + d == ans.gpus
        splits_below = {s for g, s in tried if g == ans.gpus - 1}
        assert len(splits_below) == max(1, ans.gpus - 2)  # every split of n-1 GPUs was tried
    else:
        below = planner.run_system(PLAN, system, rate, ans.gpus - 1)
        assert below.slo_attainment < PLAN.target


def test_plan_rates_is_monotone_and_starts_from_the_last_answer() -> None:
    answers = planner.plan_rates(PLAN, "ecoserve", [2.0, RATE])
    assert answers[2.0].gpus == 1 and answers[2.0].attainment_below is None
    assert answers[RATE].gpus >= answers[2.0].gpus


def test_over_max_gpus_is_reported_as_none() -> None:
    tiny = planner.Plan(trace="synthetic", n=150, max_gpus=1)
    ans = planner.min_gpus(tiny, "vllm", 40.0)
    assert ans.gpus is None and ans.attainment < tiny.target


def test_requests_grow_with_rate_for_a_fixed_window() -> None:
    p = planner.Plan(n=100, duration_s=30.0)
    assert p.requests_at(1.0) == 100 and p.requests_at(10.0) == 300
    assert "TTFT <= 0.5 s" in planner.Plan(slo="ttft-tpot", ttft_s=0.5).slo_text()
    with pytest.raises(ValueError, match="SLO kind"):
        planner.Plan(slo="p99").sim_config("vllm")


def test_cli_plan_prints_a_table_and_writes_plot_and_json(tmp_path, capsys) -> None:
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    argv = ["plan", "--trace", "synthetic", "--rates", "2", "--n", "60", "--duration", "10"]
    argv += ["--max-gpus", "4", "--plot", str(png), "--json", str(out), "--data-dir", str(tmp_path)]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "ecoserve GPUs" in text and "distserve GPUs" in text and "JCT <= 5" in text
    data = json.loads(out.read_text())
    assert data["systems"]["ecoserve"]["2"]["gpus"] == 1
    assert data["systems"]["distserve"]["2"]["split"] == "1:1"
    assert png.stat().st_size > 1000
    assert cli_main(["plan", "--systems", "nope", "--trace", "synthetic"]) == 2


def test_cli_plan_reads_a_trace_file_with_a_ttft_tpot_slo(tmp_path, capsys) -> None:
    from ecoserve_scheduler.sim.workload import TraceRecord, save_trace_file

    trace = tmp_path / "t.csv"
    save_trace_file([TraceRecord(i * 0.5, 200, 20) for i in range(40)], trace)
    argv = ["plan", "--trace", str(trace), "--rates", "1", "--n", "40", "--duration", "1"]
    argv += ["--slo", "ttft-tpot", "--ttft", "1", "--tpot", "0.1", "--systems", "ecoserve,vllm"]
    assert cli_main(argv) == 0
    assert "TTFT <= 1 s and TPOT <= 0.1 s" in capsys.readouterr().out
