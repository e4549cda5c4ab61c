"""Behaviour of SchedulerCore with every policy, and of the baselines (vLLM, Orca, SJF),
driven by the fake worker of test_core_driver.py."""

from __future__ import annotations

import pytest
from test_core_driver import (
    EOS,
    POLICY_NAMES,
    TOKEN,
    Driver,
    ledger_of,
    mixed_workload,
    spec,
)

# ---- every policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_finishes_every_request(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=200, block_size=16, token_budget=128)])
    mixed_workload(d)
    d.run()
    d.check_done()
    assert d.core.counters.finished == 12


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_finishes_under_kv_pressure(policy: str) -> None:
    """40 blocks of 16 tokens hold about three of these requests at once."""
    d = Driver(policy, [spec(num_blocks=40, block_size=16, token_budget=64)])
    mixed_workload(d)
    d.run()
    d.check_done()
    if policy == "orca":
        assert d.core.counters.preemptions == 0
    if policy in ("vllm", "sjf"):
        assert d.core.counters.preemptions > 0  # on-demand paging runs out mid-generation


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_on_two_workers(policy: str) -> None:
    d = Driver(
        policy,
        [
            spec(num_blocks=40, token_budget=64, wid="w0"),
            spec(num_blocks=60, token_budget=96, wid="w1"),
        ],
    )
    mixed_workload(d)
    d.run()
    d.check_done()
    assert {p.worker_id for p in d.plans} == {"w0", "w1"}


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_length_cap_and_ignore_eos(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=64, max_model_len=60)])
    d.add("capped", prompt=10, target=30, max_tokens=7)
    d.add("ignore", prompt=10, target=3, max_tokens=9, ignore_eos=True)
    d.add("ctx", prompt=50, target=30, max_tokens=40)  # reaches max_model_len first
    d.add("stop", prompt=10, target=30, stop=(TOKEN,))  # its first token is a stop token
    d.run()
    r = d.core.requests
    assert (r["capped"].finish_reason, r["capped"].num_output) == ("length", 7)
    assert (r["ignore"].finish_reason, r["ignore"].num_output) == ("length", 9)
    assert EOS in r["ignore"].output_token_ids  # it sampled EOS and kept going
    assert (r["ctx"].finish_reason, r["ctx"].num_output) == ("length", 10)
    assert (r["stop"].finish_reason, r["stop"].output_token_ids) == ("stop", [TOKEN])
    assert all(d.finishes[k] == r[k].finish_reason for k in r)
    d.check_empty()


# ---- vLLM ------------------------------------------------------------------------------------


def test_vllm_preempts_the_most_recent_request_and_it_still_finishes() -> None:
    # 8 blocks of 4 tokens; each request grows to 8 + 12 = 20 tokens = 5 blocks.
    d = Driver("vllm", [spec(num_blocks=8, block_size=4, token_budget=64)])
    d.add("a", prompt=8, target=12)
    d.add("b", prompt=8, target=12)
    d.run()
    assert [(e.request_id, e.reason) for e in d.preempts] == [("b", "KV cache needed by a")]
    assert d.core.requests["b"].preemptions == 1 and d.core.requests["a"].preemptions == 0
    assert d.core.counters.preemptions == 1
    # b was recomputed from position 0 with its outputs kept, not re-sampled
    b_plans = [s for p in d.plans for s in p.seqs if s.request_id == "b"]
    restart = [s for s in b_plans if s.start_pos == 0]
    assert len(restart) == 2 and restart[1].num_tokens > 8
    d.check_done()


def test_vllm_preempts_the_newest_request_even_when_it_is_the_one_growing() -> None:
    # 5 blocks of 4: a (8 tokens) fills 2 blocks, b (6 tokens) leaves room in its 2nd block;
    # a takes the last free block first, then b needs one: b is the newest, so b goes.
    d = Driver("vllm", [spec(num_blocks=5, block_size=4, token_budget=64)])
    d.add("a", prompt=8, target=12)
    d.add("b", prompt=6, target=12)
    d.run()
    d.check_done()
    assert [(e.request_id, e.reason) for e in d.preempts] == [("b", "out of KV cache")]
    assert d.core.requests["a"].preemptions == 0


# ---- Orca ------------------------------------------------------------------------------------


def test_orca_reserves_prompt_plus_max_tokens_and_never_preempts() -> None:
    d = Driver("orca", [spec(num_blocks=30, block_size=16, token_budget=64)])
    for i in range(6):
        d.add(f"r{i}", prompt=20 + 10 * i, target=10 + 5 * i, max_tokens=100 + 20 * i)
    plan = d.schedule()
    ledger = ledger_of(d)
    for s in plan.seqs:
        r = d.core.requests[s.request_id]
        assert len(ledger.table(s.request_id)) == ledger.blocks_for(
            r.prompt_len + 100 + 20 * int(s.request_id[1:])
        )
        assert s.start_pos == 0 and s.num_tokens == r.prompt_len and s.sample  # unchunked
    # r0 (8 blocks) + r1 (9) + r2 (10) = 27 of 30 blocks; r3 (11) must wait
    assert [s.request_id for s in plan.seqs] == ["r0", "r1", "r2"]
    d.apply(d.result(plan))
    sizes = {}
    while not all(r.status.done for r in d.core.requests.values()):
        d.step()
        for rid in d.core.workers["w0"].running:
            n = len(ledger.table(rid))
            assert sizes.setdefault(rid, n) == n  # never grows: it was reserved up front
    assert d.core.counters.preemptions == 0 and d.core.counters.extensions == 0
    d.check_done()


def test_orca_runs_a_prompt_larger_than_the_budget_whole() -> None:
    d = Driver("orca", [spec(num_blocks=64, block_size=16, token_budget=32)])
    d.add("long", prompt=100, target=3)
    plan = d.schedule()
    assert [(s.start_pos, s.num_tokens, s.sample) for s in plan.seqs] == [(0, 100, True)]
    d.apply(d.result(plan))
    d.run()
    d.check_done()


# ---- chunked prefill and batch composition ---------------------------------------------------


@pytest.mark.parametrize("policy", ["vllm", "sarathi", "ecoserve", "sjf"])
def test_chunked_prefill_respects_the_token_budget(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=64, block_size=16, token_budget=32)])
    d.add("long", prompt=100, target=3)
    chunks = []
    for _ in range(4):
        plan = d.schedule()
        chunks.append([(s.start_pos, s.num_tokens, s.sample) for s in plan.seqs])
        d.apply(d.result(plan))
    assert chunks == [[(0, 32, False)], [(32, 32, False)], [(64, 32, False)], [(96, 4, True)]]
    d.add("other", prompt=70, target=2)
    d.run()  # check_plan asserts the budget on every plan
    assert all(p.num_tokens <= 32 for p in d.plans)
    assert max(p.num_tokens for p in d.plans) == 32
    d.check_done()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_decodes_run_before_prefill_chunks_and_never_stall(policy: str) -> None:
    """Stall-free batching (Sarathi; EcoServe's SyncDecoupled): every decode takes its token
    before any prompt chunk fills the rest of the budget. check_plan asserts on every plan that
    no decoding request with room waits while a chunk runs."""
    d = Driver(policy, [spec(num_blocks=100, block_size=16, token_budget=24)])
    d.add("short0", prompt=4, target=30)
    d.add("short1", prompt=4, target=30)
    d.step()
    d.add("p0", prompt=60, target=30)  # longer than the budget left by the two decodes
    d.add("p1", prompt=40, target=30)
    mixed = 0
    while not all(r.status.done for r in d.core.requests.values()):
        plan = d.schedule()
        if plan.decodes.request_ids and plan.prefills:
            mixed += 1
            n = len(plan.decodes)
            assert all(s.num_tokens == 1 and s.sample for s in plan.seqs[:n])
            assert plan.sampled_ids()[:n] == list(plan.decodes.request_ids)
        d.apply(d.result(plan))
    assert mixed > 0  # some plans mixed decodes and prefill chunks
    d.check_done()


def test_max_num_seqs_caps_admissions() -> None:
    d = Driver("vllm", [spec(num_blocks=100, block_size=16, token_budget=512, max_num_seqs=3)])
    for i in range(7):
        d.add(f"r{i}", prompt=8, target=4)
    d.run()
    assert max(len(p.seqs) for p in d.plans) == 3
    d.check_done()


# ---- SJF -------------------------------------------------------------------------------------


def test_sjf_admits_the_shortest_prediction_first() -> None:
    d = Driver("sjf", [spec(num_blocks=100, block_size=16, token_budget=512)])
    for rid, predicted in [("long", 90), ("short", 5), ("mid", 40), ("tie", 40)]:
        d.add(rid, prompt=10, target=predicted)
        d.now += 0.001
    plan = d.schedule()
    assert [s.request_id for s in plan.seqs] == ["short", "mid", "tie", "long"]
    d.apply(d.result(plan))
    d.run()
    d.check_done()


def test_sjf_admits_shortest_first_when_only_one_fits() -> None:
    d = Driver("sjf", [spec(num_blocks=100, block_size=16, token_budget=512, max_num_seqs=1)])
    for rid, predicted in [("c", 30), ("a", 10), ("b", 20)]:
        d.add(rid, prompt=10, target=predicted)
    d.run()
    order = []
    for p in d.plans:
        for s in p.seqs:
            if s.start_pos == 0:
                order.append(s.request_id)
    assert order == ["a", "b", "c"]
    d.check_done()
