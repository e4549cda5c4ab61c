"""SLO definitions of the simulator (sim/sweep.py, sim/metrics.py): JCT, TTFT/TPOT goodput and
the two-class mix; scoring one run under several definitions; the warm-started rate search."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from ecoserve_scheduler.core.policies import POLICIES
from ecoserve_scheduler.sim.cost_model import CostModel, load_profile
from ecoserve_scheduler.sim.engine import SimConfig, simulate
from ecoserve_scheduler.sim.metrics import RequestMetrics, meets
from ecoserve_scheduler.sim.rl_models import make_rl_model
from ecoserve_scheduler.sim.sweep import (
    Scenario,
    SloClass,
    SloSpec,
    evaluate,
    round_rate,
    search_max_rate,
    simulate_at,
    ttft_tpot_targets,
)
from ecoserve_scheduler.sim.workload import TraceRecord

COST = CostModel(load_profile("llama-2-7b_a100-80gb"))
TWO = SloSpec(
    "two-class",
    "ttft-tpot",
    classes=(SloClass("interactive", 0.5, 0.3, 0.05), SloClass("batch", 0.5, 3.0, 0.1)),
)


def _m(i, finished=True, ttft=0.1, tpot=0.02, jct=1.0, prompt=100, out=40) -> RequestMetrics:
    return RequestMetrics(
        f"r{i}", 0.0, prompt, out, finished, ttft, tpot if out > 1 else None,
        jct if finished else None, None, False, 0,
    )  # fmt: skip


def test_meets_judges_each_bound():
    assert meets(_m(0)) and meets(_m(0), jct_s=1.0, ttft_s=0.1, tpot_s=0.02)
    assert not meets(_m(0, finished=False))  # unfinished never meets any SLO
    assert not meets(_m(0), jct_s=0.99)
    assert not meets(_m(0), ttft_s=0.099)
    assert not meets(_m(0), tpot_s=0.019)
    assert meets(_m(0, out=1, tpot=9.0), ttft_s=0.1, tpot_s=0.01)  # one token: no TPOT


def test_assign_is_a_seeded_coin_per_request():
    a = TWO.assign(4000, seed=0)
    assert a == TWO.assign(4000, seed=0)  # same seed, same classes: every rate, every policy
    assert a != TWO.assign(4000, seed=1)
    assert set(a) == {0, 1} and abs(sum(a) / len(a) - 0.5) < 0.03
    assert TWO.assign(10, 0) == TWO.assign(20, 0)[:10]  # request i keeps its class as n grows
    three = SloSpec("x", "ttft-tpot", classes=(
        SloClass("a", 0.2, 1, 1), SloClass("b", 0.3, 1, 1), SloClass("c", 0.5, 1, 1)))  # fmt: skip
    shares = [three.assign(6000, 2).count(i) / 6000 for i in range(3)]
    assert shares == pytest.approx([0.2, 0.3, 0.5], abs=0.03)
    assert SloSpec("jct").assign(5, 0) == [0] * 5


def test_spec_validation_and_sim_fields():
    with pytest.raises(ValueError, match="shares"):
        SloSpec("bad", "ttft-tpot", classes=(SloClass("a", 0.4, 1, 1),))
    with pytest.raises(ValueError, match="kind"):
        SloSpec("bad", "p99")
    assert SloSpec("jct", k=3.0).sim_fields(4, 0) == {"slo_k": 3.0}
    one = SloSpec("t", "ttft-tpot", classes=(SloClass("all", 1.0, 0.5, 0.04),))
    assert one.sim_fields(4, 0) == {"slo_ttft_s": 0.5, "slo_tpot_s": 0.04}
    per = TWO.sim_fields(50, 0)["slo_per_request"]
    want = [(0.3, 0.05) if c == 0 else (3.0, 0.1) for c in TWO.assign(50, 0)]
    assert list(per) == want


def test_targets_are_multiples_of_the_unloaded_request():
    ttft, tpot = ttft_tpot_targets(COST, 700, 250, 5.0, 5.0)
    assert ttft == pytest.approx(5 * COST.prefill_time(700))
    per_token = (COST.unloaded_jct(700, 250) - COST.prefill_time(700)) / 249
    assert tpot == pytest.approx(5 * per_token)
    # The unloaded TPOT lies between a batch-1 step at the first and at the last context.
    assert COST.decode_step_time(1, 700) <= per_token <= COST.decode_step_time(1, 950)
    assert 0.005 < per_token < 0.05 and 0.01 < ttft / 5 < 0.5  # 7B on an A100: ms-scale steps


def test_engine_applies_per_request_classes():
    """Four requests far apart (no queueing): tight TTFT, loose, tight TPOT, loose."""
    recs = [TraceRecord(100.0 * i, 200, 30) for i in range(4)]
    per_req = ((1e-4, 1.0), (10.0, 1.0), (10.0, 1e-6), (10.0, 1.0))
    cfg = SimConfig("vllm", slo_per_request=per_req)
    run_m, per = simulate(recs, cfg, COST, make_rl_model("oracle"))
    assert [m.slo_met for m in per] == [False, True, False, True]
    assert run_m.slo_attainment == 0.5


def test_evaluate_two_classes_by_hand():
    classes = TWO.assign(6, seed=0)
    # TTFT 0.5 s misses interactive (0.3 s) but meets batch (3 s); request 5 never finished.
    per = [_m(i, ttft=0.5 if i % 2 else 0.1, tpot=0.04, finished=i != 5) for i in range(6)]
    want = [i != 5 and (c == 1 or i % 2 == 0) for i, c in enumerate(classes)]
    got = evaluate(TWO, per, COST, 0, duration_s=2.0)
    assert got["slo_attainment"] == pytest.approx(sum(want) / 6)
    assert got["goodput_rps"] == pytest.approx(sum(want) / 2.0)
    for k, name in enumerate(("interactive", "batch")):
        idx = [i for i, c in enumerate(classes) if c == k]
        cls = got["classes"][name]
        assert cls["requests"] == len(idx)
        assert cls["slo_attainment"] == pytest.approx(sum(want[i] for i in idx) / max(1, len(idx)))
    jct = evaluate(SloSpec("jct", k=5.0), [_m(0, jct=1e-3)], COST, 0, 1.0)
    assert jct["slo_attainment"] == 1.0 and "classes" not in jct


def _attain(knee: float, calls: list):
    def f(rate: float) -> float:
        calls.append(rate)
        return 1.0 if rate <= knee else 0.5

    return f


@pytest.mark.parametrize("guess", [None, 5.0, 40.0, 0.3])
def test_search_brackets_the_knee(guess):
    calls: list[float] = []
    rate, tried = search_max_rate(_attain(5.3, calls), 0.9, 1.0, 64.0, 0.05, guess=guess)
    assert rate <= 5.3 < rate * 1.05 + 1e-9
    assert len(calls) == len(set(calls)) == len(tried)  # no rate asked twice
    assert all(r == round_rate(r) for r in tried)
    if guess == 5.0:
        assert len(calls) <= 5  # a near guess: bracket in 2, bisect in ~3


def test_search_edges():
    calls: list[float] = []
    assert search_max_rate(_attain(0.0, calls), lo=1.0)[0] == 0.0  # nothing passes
    assert min(calls) >= 1.0 / 16
    assert search_max_rate(_attain(1e9, []), lo=1.0, hi=64.0)[0] == 64.0
    rate, _ = search_max_rate(_attain(0.2, []), lo=1.0, rel_tol=0.05)
    assert 0.19 <= rate <= 0.2


def _blind() -> list[str]:
    return [p for p in ("vllm", "vllm-v0", "sarathi", "orca", "sjf") if p in POLICIES]


@pytest.mark.parametrize("policy", _blind())
def test_slo_blind_policies_schedule_alike_under_every_slo(tmp_path, policy):
    """bench/sim.py scores one run of these policies under every SLO definition: their
    schedule must not depend on the SLO, and `evaluate` must agree with the engine."""
    sc = Scenario(trace="sharegpt", n=120, data_dir=str(tmp_path), fallback=True)
    rate = 7.0  # past vLLM's knee on this profile: queues build, so an SLO could matter
    base_m, base = simulate_at(sc, policy, rate)
    for spec in (TWO, SloSpec("jct", k=2.0)):
        m, per = simulate_at(replace(sc, slo=spec), policy, rate)
        assert [(x.ttft_s, x.jct_s) for x in per] == [(x.ttft_s, x.jct_s) for x in base]
        got = evaluate(spec, base, COST, sc.seed, base_m.duration_s)
        assert [x.slo_met for x in per] == _verdicts(spec, base, sc.seed)
        assert got["slo_attainment"] == pytest.approx(m.slo_attainment)


def _verdicts(spec: SloSpec, per, seed: int) -> list[bool]:
    if spec.kind == "jct":
        return [meets(x, jct_s=spec.k * COST.unloaded_jct(x.prompt_tokens, x.output_tokens))
                for x in per]  # fmt: skip
    cls = spec.assign(len(per), seed)
    return [meets(x, ttft_s=spec.classes[c].ttft_s, tpot_s=spec.classes[c].tpot_s)
            for x, c in zip(per, cls, strict=True)]  # fmt: skip


def test_ecoserve_reads_the_slo_and_evaluate_matches_its_verdict(tmp_path):
    sc = Scenario(trace="sharegpt", n=120, data_dir=str(tmp_path), fallback=True)
    m_two, per_two = simulate_at(replace(sc, slo=TWO), "ecoserve", 7.0)
    got = evaluate(TWO, per_two, COST, sc.seed, m_two.duration_s)
    assert got["slo_attainment"] == pytest.approx(m_two.slo_attainment)
    assert [x.slo_met for x in per_two] == _verdicts(TWO, per_two, sc.seed)
    _, per_jct = simulate_at(sc, "ecoserve", 7.0)
    assert [x.ttft_s for x in per_two] != [x.ttft_s for x in per_jct]  # SLO-aware ordering


def test_kv_usage_and_preemption_fields(tmp_path):
    sc = Scenario(trace="sharegpt", n=120, data_dir=str(tmp_path), fallback=True)
    m, per = simulate_at(sc, "vllm", 7.0)
    assert 0 < m.kv_reserved_share <= m.kv_reserved_share_max <= 1
    assert 0 < m.kv_used_share <= m.kv_used_share_max <= m.kv_reserved_share_max + 1e-9
    assert m.kv_used_share <= m.kv_reserved_share + 1e-9
    assert m.preempted_requests == sum(1 for x in per if x.preemptions) <= m.preemptions
    assert not math.isnan(m.kv_used_share)
