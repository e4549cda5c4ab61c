"""Cluster baselines in the simulator: DistServe (disaggregated) and vLLM data-parallel replicas."""

from __future__ import annotations

import math

import pytest

from ecoserve_scheduler.core import Request, SamplingParams, SchedulerCore, WorkerSpec, make_policy
from ecoserve_scheduler.sim.cost_model import CostModel
from ecoserve_scheduler.sim.distserve import DistConfig, DistServeSim, simulate_distserve
from ecoserve_scheduler.sim.engine import SimConfig, simulate
from ecoserve_scheduler.sim.links import LINKS, get_link, kv_transfer_s
from ecoserve_scheduler.sim.replicas import route, simulate_replicas
from ecoserve_scheduler.sim.rl_models import make_rl_model
from ecoserve_scheduler.sim.workload import TraceRecord, build_workload

COST = CostModel.from_name("llama-2-7b_a100-80gb")
RL = make_rl_model("oracle")


def synthetic(n: int = 120, rate: float = 4.0) -> list[TraceRecord]:
    return build_workload("synthetic", rate, n, seed=0)[0]


def test_link_table_and_transfer_cost() -> None:
    assert {"nvlink-a100", "pcie-gen4", "pcie-gen5", "net-100g", "net-200g", "net-400g"} <= set(
        LINKS
    )
    assert get_link("nvlink") is LINKS["nvlink-a100"] and get_link("pcie") is LINKS["pcie-gen4"]
    with pytest.raises(ValueError, match="unknown link"):
        get_link("carrier-pigeon")
    # Llama-2-7B: 2 (K, V) x 32 layers x 32 heads x 128 dims x 2 bytes = 0.5 MiB per token.
    per_token = COST.profile.kv_bytes_per_token
    assert per_token == 2 * 32 * 32 * 128 * 2
    net = LINKS["net-100g"]
    assert kv_transfer_s(1000, per_token, net) == pytest.approx(20e-6 + 1000 * per_token / 12.5e9)
    assert kv_transfer_s(1000, per_token, LINKS["nvlink-a100"]) == pytest.approx(
        10e-6 + 524288e3 / 300e9
    )
    assert net.transfer_s(0) == 0.0


def one_request(link: str, prompt: int = 1000, out: int = 3) -> Request:
    sim = DistServeSim(
        [TraceRecord(0.0, prompt, out)], SimConfig("vllm"), DistConfig(link=link), COST, RL
    )
    sim.run()
    return sim.requests[0]


def test_kv_transfer_time_is_on_the_critical_path() -> None:
    fast, slow = one_request("nvlink-a100"), one_request("net-100g")
    per_token = COST.profile.kv_bytes_per_token
    extra = kv_transfer_s(1000, per_token, LINKS["net-100g"]) - kv_transfer_s(
        1000, per_token, LINKS["nvlink-a100"]
    )
    assert fast.first_token_s == slow.first_token_s == pytest.approx(COST.prefill_chunk_time(1000))
    jct_fast, jct_slow = fast.finished_s - fast.arrival_s, slow.finished_s - slow.arrival_s
    assert jct_slow - jct_fast == pytest.approx(extra)
    assert fast.num_output == 3


def test_decode_kv_capacity_limits_admission() -> None:
    # 100-token prompts with 10 outputs hold 7 blocks each on a decode GPU of 20 blocks:
    # two run at a time, the third waits (its KV stays on the prefill GPU) until one finishes.
    recs = [TraceRecord(0.0, 100, 10) for _ in range(3)]
    dist = DistConfig(prefill=1, decode=1, num_blocks=40, watermark=0.0)
    sim = DistServeSim(recs, SimConfig("vllm"), dist, COST, RL)
    sim.decodes[0].free = 20  # a smaller decode GPU than prefill GPU
    run, per = sim.run()
    assert run.finished == 3 and sim.peak_decode_running == 2
    finished = sorted(r.finished_s for r in sim.requests)
    first_token = max(r.first_token_s for r in sim.requests)
    assert finished[2] - finished[0] > 8 * COST.decode_step_time(1, 100)  # it waited
    assert first_token < finished[0]  # all prefilled early: only decode capacity held it back
    big = DistServeSim(recs, SimConfig("vllm"), DistConfig(num_blocks=40), COST, RL)
    big.run()
    assert big.peak_decode_running == 3


def test_distserve_finishes_every_request_with_its_length() -> None:
    recs = synthetic()
    run, per = simulate_distserve(recs, SimConfig("vllm"), DistConfig(2, 2), COST, RL)
    assert run.finished == len(recs)
    for rec, m in zip(recs, per, strict=True):
        assert m.output_tokens == max(1, min(rec.output_tokens, 4096 - m.prompt_tokens))
        assert m.ttft_s is not None and m.ttft_s > 0


def test_distserve_needs_both_kinds_of_instance() -> None:
    with pytest.raises(ValueError):
        simulate_distserve(synthetic(5), SimConfig("vllm"), DistConfig(0, 2), COST, RL)


def test_ttft_tpot_slo_is_checked_per_request() -> None:
    recs = synthetic(60, 2.0)
    loose = SimConfig("vllm", slo_ttft_s=10.0, slo_tpot_s=1.0)
    tight = SimConfig("vllm", slo_ttft_s=1e-4, slo_tpot_s=1.0)
    assert simulate(recs, loose, COST, RL)[0].slo_attainment == 1.0
    assert simulate(recs, tight, COST, RL)[0].slo_attainment == 0.0
    ds = simulate_distserve(recs, tight, DistConfig(), COST, RL)[0]
    assert ds.slo_attainment == 0.0 and ds.finished == len(recs)


def test_router_round_robin_and_least_loaded() -> None:
    cores = []
    for i in range(3):
        core = SchedulerCore(make_policy("vllm"))
        core.add_worker(WorkerSpec(f"w{i}", num_blocks=64))
        cores.append(core)
    assert [route("round-robin", cores, i) for i in range(5)] == [0, 1, 2, 0, 1]
    for k, core in enumerate(cores):  # 2, 0, 1 requests waiting
        for j in range((2, 0, 1)[k]):
            core.add(Request(f"c{k}-{j}", 8, 0.0, SamplingParams(max_tokens=8)), 0.0)
    assert route("least-loaded", cores, 0) == 1


@pytest.mark.parametrize("router", ["round-robin", "least-loaded"])
def test_replicas_finish_everything_and_spread_it(router: str) -> None:
    recs = synthetic(150, 8.0)
    run, per = simulate_replicas(recs, SimConfig("vllm"), COST, RL, 3, router)
    assert run.finished == len(recs)
    one, _ = simulate_replicas(recs, SimConfig("vllm"), COST, RL, 1, router)
    assert run.mean_jct_s < one.mean_jct_s  # three GPUs beat one at a load one struggles with
    with pytest.raises(ValueError, match="unknown router"):
        simulate_replicas(recs, SimConfig("vllm"), COST, RL, 2, "random")
    assert math.isfinite(run.p99_ttft_s)
