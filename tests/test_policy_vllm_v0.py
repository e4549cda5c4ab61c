"""The vLLM v0 baseline ("vllm-v0", core/policies/vllm_v0.py) on small crafted scenarios, driven
through SchedulerCore by the fake worker of test_core_driver.py: prefill-only iterations, whole
prompts within max_num_batched_tokens, max_num_seqs over every running request, and recompute
preemption of the latest arrival."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_core_driver import Driver, ledger_of, mixed_workload, spec

from ecoserve_scheduler.core import POLICIES, BatchPlan, Status, make_policy
from ecoserve_scheduler.core.policies.base import NewestVictim
from ecoserve_scheduler.core.policies.vllm_v0 import LatestArrival, PrefillFirstBudget
from ecoserve_scheduler.sim.cost_model import CostModel, load_profile
from ecoserve_scheduler.sim.engine import SimConfig, simulate
from ecoserve_scheduler.sim.rl_models import OracleRL
from ecoserve_scheduler.sim.workload import build_workload


class V0Driver(Driver):
    """Driver whose per-plan check is v0's instead of the stall-free one (v0 stalls decodes
    behind prompts on purpose): a plan is all prompts, each whole, within the batched-token
    budget, or all decodes; never more running requests than max_num_seqs."""

    def __init__(self, specs, **options) -> None:
        super().__init__("vllm-v0", specs, **options)
        self.budget = PrefillFirstBudget(options.get("max_num_batched_tokens"))

    def check_plan(self, plan: BatchPlan) -> None:
        w = self.core.workers[plan.worker_id]
        assert len(w.running) <= w.spec.max_num_seqs
        if plan.prefills:
            assert plan.decodes.request_ids == (), "a prefill iteration holds no decode rows"
            for s in plan.prefills:
                r = self.core.requests[s.request_id]
                assert s.start_pos == 0 and s.num_tokens == r.num_tokens and s.sample  # whole
            limit = max(self.budget.max_num_batched_tokens or 2048, w.spec.max_model_len)
            assert sum(s.num_tokens for s in plan.prefills) <= limit
        for s in plan.seqs:
            assert self.core.requests[s.request_id].status is Status.RUNNING


def test_registered_with_its_hooks() -> None:
    assert "vllm-v0" in POLICIES
    p = make_policy("vllm-v0")
    assert p.name == "vllm-v0" and p.prefill_first and not p.chunked
    assert isinstance(p.victims, LatestArrival) and p.admission.headroom_share == 0.01
    assert not any(make_policy(n).prefill_first for n in POLICIES if n != "vllm-v0")


def test_a_prompt_runs_alone_while_decodes_wait() -> None:
    d = V0Driver([spec(num_blocks=200, block_size=16, token_budget=64, max_model_len=512)])
    d.add("a", prompt=100, target=20)
    first = d.schedule()
    # 100 tokens > the worker's 64-token budget: v0 does not chunk, the prompt runs whole.
    assert [(s.request_id, s.start_pos, s.num_tokens) for s in first.prefills] == [("a", 0, 100)]
    d.apply(d.result(first))
    assert d.step() == 1 and d.plans[-1].decodes.request_ids == ("a",)
    d.add("b", prompt=50, target=5)
    a_out = d.core.requests["a"].num_output
    d.step()
    plan = d.plans[-1]  # b's prompt: a, decoding, gets no token in this iteration
    assert [s.request_id for s in plan.prefills] == ["b"] and plan.decodes.request_ids == ()
    assert "a" in d.core.workers["w0"].decoding and d.core.requests["a"].num_output == a_out
    d.step()
    assert set(d.plans[-1].decodes.request_ids) == {"a", "b"} and not d.plans[-1].prefills
    d.run()
    d.check_done()


def test_whole_prompts_within_max_num_batched_tokens_fcfs() -> None:
    # The budget (300) is above max_model_len (256), as vLLM requires without chunking.
    specs = [spec(num_blocks=200, token_budget=32, max_model_len=256)]
    d = V0Driver(specs, max_num_batched_tokens=300)
    for rid, prompt in (("p200", 200), ("p150", 150), ("p90", 90)):
        d.add(rid, prompt=prompt, target=4)
    d.step()  # 200 fits; 150 does not fit the 100 left, and 90 must not overtake it
    assert [(s.request_id, s.num_tokens) for s in d.plans[0].prefills] == [("p200", 200)]
    d.step()  # the next iteration is prompts again (p200 waits): 150 + 90 <= 300
    second = [(s.request_id, s.num_tokens) for s in d.plans[1].prefills]
    assert second == [("p150", 150), ("p90", 90)]
    assert d.plans[1].decodes.request_ids == ()
    d.run()
    d.check_done()


def test_default_budget_is_v0s_max_model_len_or_2048() -> None:
    budget = PrefillFirstBudget()
    step = SimpleNamespace(spec=spec(max_model_len=4096), decode_ids=[], prefills=[])
    assert budget.prefill_budget(step) == 4096  # max(max_model_len, 2048)
    step.spec = spec(max_model_len=1024)
    assert budget.prefill_budget(step) == 2048
    # vLLM refuses max_num_batched_tokens < max_model_len without chunking: raised to it here.
    assert PrefillFirstBudget(100).prefill_budget(step) == 1024
    step.decode_ids = ["x"]
    assert budget.prefill_budget(step) == 0  # a decode iteration admits nothing

    d = V0Driver([spec(num_blocks=400, token_budget=64)])  # max_model_len 4096
    d.add("long", prompt=3000, target=3)
    d.add("next", prompt=1500, target=3)
    d.step()
    assert [s.num_tokens for s in d.plans[0].prefills] == [3000]  # 3000 + 1500 > 4096
    d.run()
    d.check_done()


def test_max_num_seqs_counts_every_running_request() -> None:
    d = V0Driver([spec(num_blocks=400, token_budget=512, max_num_seqs=3)])
    for i in range(5):
        d.add(f"r{i}", prompt=20, target=10 + 5 * i)
    d.step()
    assert [s.request_id for s in d.plans[0].prefills] == ["r0", "r1", "r2"]
    done_when_admitted = {}
    for _ in range(500):
        if all(r.status.done for r in d.core.requests.values()):
            break
        seen = len(d.plans)
        d.step()
        for plan in d.plans[seen:]:
            assert not plan.prefills or not plan.decodes.request_ids
            for s in plan.prefills:
                done = {k for k, r in d.core.requests.items() if r.status.done}
                done_when_admitted[s.request_id] = done
    # r3 and r4 join only as r0 and then r1 (the shortest) finish and free a sequence slot.
    assert set(done_when_admitted) == {"r3", "r4"}
    assert done_when_admitted["r3"] == {"r0"} and done_when_admitted["r4"] == {"r0", "r1"}
    d.check_done()


def test_recompute_preempts_the_latest_arrival_and_it_reprefills_whole() -> None:
    # 8 blocks of 4 tokens; each request grows to 8 + 12 = 20 tokens = 5 blocks.
    d = V0Driver([spec(num_blocks=8, block_size=4, token_budget=64)])
    d.add("a", prompt=8, target=12, arrival=0.0)
    d.add("b", prompt=8, target=12, arrival=0.001)
    d.run()
    assert [(e.request_id, e.reason) for e in d.preempts] == [("b", "KV cache needed by a")]
    assert d.core.requests["a"].preemptions == 0 and d.core.requests["b"].preemptions == 1
    b_prefills = [(p, s) for p in d.plans for s in p.prefills if s.request_id == "b"]
    assert len(b_prefills) == 2
    _, again = b_prefills[1]
    assert again.start_pos == 0 and again.num_tokens > 8  # prompt + the outputs it had
    d.check_done()


def test_victim_is_the_latest_arrival_not_the_latest_admitted() -> None:
    """v0 sorts its running queue by arrival (FCFS) and preempts from its tail: a recomputed
    request re-admitted last keeps its early arrival, so a later arrival goes first."""
    a, b, c = (SimpleNamespace(request_id=k, arrival_s=float(t)) for t, k in enumerate("abc"))
    step = SimpleNamespace(running={"a": a, "c": c, "b": b})  # admission order: b re-admitted
    assert LatestArrival().victim(step, a) is c
    assert NewestVictim().victim(step, a) is b  # what v1 ("vllm") picks
    assert LatestArrival().victim(SimpleNamespace(running={"a": a}), a) is a  # itself, last


@pytest.mark.parametrize("blocks", [40, 200])
def test_mixed_workload_finishes_with_and_without_kv_pressure(blocks: int) -> None:
    d = V0Driver([spec(num_blocks=blocks, block_size=16, token_budget=64)])
    mixed_workload(d)
    d.run()
    d.check_done()
    assert (d.core.counters.preemptions > 0) == (blocks == 40)
    assert ledger_of(d).num_free == blocks
    prefill_plans = [p for p in d.plans if p.prefills]
    assert prefill_plans and all(not p.decodes.request_ids for p in prefill_plans)


def test_in_the_simulator_v0_trades_decode_latency_for_time_to_first_token() -> None:
    """Same trace, same cost model: v0's prompt-only iterations stall running decodes (higher
    TPOT) and start prompts sooner (lower TTFT) than v1's chunked prefill."""
    records, _ = build_workload("synthetic", 3.0, 200, seed=3)
    cost = CostModel(load_profile("llama-2-7b/a100-80gb"))
    runs = {
        p: simulate(records, SimConfig(policy=p), cost, OracleRL())[0] for p in ("vllm", "vllm-v0")
    }
    v0, v1 = runs["vllm-v0"], runs["vllm"]
    assert v0.finished == v1.finished == 200
    assert v0.mean_tpot_s > v1.mean_tpot_s
    assert v0.mean_ttft_s < v1.mean_ttft_s


def test_two_workers_and_a_removed_worker() -> None:
    d = V0Driver([spec(num_blocks=40, token_budget=64, wid="w0"), spec(num_blocks=60, wid="w1")])
    mixed_workload(d)
    d.run()
    d.check_done()
    assert {p.worker_id for p in d.plans} == {"w0", "w1"}

    specs = [spec(num_blocks=64, wid="w0"), spec(num_blocks=64, wid="w1")]
    d = V0Driver(specs, placement="first-idle")
    d.add("a", prompt=20, target=10)
    d.add("b", prompt=20, target=10)
    d.apply(d.result(d.schedule("w0")))
    plan = d.schedule("w0")  # both decoding on w0 when it dies
    assert set(plan.decodes.request_ids) == {"a", "b"}
    d.record(d.core.remove_worker("w0", d.now))
    assert d.core.num_waiting == 2
    d.run()
    assert {p.worker_id for p in d.plans[2:]} == {"w1"}
    d.check_done()
