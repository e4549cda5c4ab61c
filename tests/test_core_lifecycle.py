"""Abort, failures, worker removal, step errors, bad results and reporting."""

from __future__ import annotations

import pytest
from test_core_driver import (
    EOS,
    POLICY_NAMES,
    Driver,
    ecoserve_host_and_guest,
    ledger_of,
    spec,
)

from ecoserve_scheduler.core import (
    FinishEvent,
    PreemptEvent,
    Status,
    StepResult,
    make_policy,
)

# ---- abort, failures, workers ----------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_abort_frees_blocks_at_once_and_ignores_the_in_flight_result(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=64)])
    d.add("a", prompt=40, target=20)
    d.add("b", prompt=40, target=20)
    d.add("waiting", prompt=40, target=20)
    d.core.policy  # noqa: B018
    plan = d.schedule()
    d.apply(d.result(plan))
    plan = d.schedule()
    assert "a" in {s.request_id for s in plan.seqs}
    used = ledger_of(d).usage().blocks_used
    held = len(ledger_of(d).table("a"))
    d.abort("a")
    assert d.finishes["a"] == "aborted" and d.core.requests["a"].status is Status.ABORTED
    assert not ledger_of(d).has("a") and ledger_of(d).usage().blocks_used == used - held
    n_tokens = len(d.tokens["a"])
    events = d.apply(d.result(plan))
    assert not any(e.request_id == "a" for e in events)
    assert len(d.tokens["a"]) == n_tokens and d.core.requests["a"].num_output == n_tokens
    assert d.core.abort("a", d.now) == []  # already done
    d.targets["a"] = n_tokens
    d.run()
    assert d.core.requests["b"].status is Status.FINISHED
    d.check_empty()


def test_abort_of_a_waiting_request() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("w", prompt=10, target=3)
    d.abort("w")
    assert d.core.num_waiting == 0 and d.finishes["w"] == "aborted"
    assert d.schedule() is None
    assert d.core.abort("nope", d.now) == []


def test_abort_of_a_host_hands_the_loan_to_its_guest() -> None:
    d, ledger = ecoserve_host_and_guest()
    d.step()
    assert ledger.is_guest("g")
    g_table = list(ledger.table("g"))
    d.abort("h")
    assert not ledger.is_guest("g") and ledger.table("g") == g_table
    assert ledger.num_free == 16 - 3
    d.targets["h"] = d.core.requests["h"].num_output
    d.run()
    assert d.core.requests["g"].status is Status.FINISHED
    assert d.core.requests["g"].num_output == 8
    d.check_empty()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_prompt_longer_than_max_model_len_fails_at_add(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=64, max_model_len=100)])
    d.add("long", prompt=100, target=3)
    r = d.core.requests["long"]
    assert r.status is Status.FAILED and r.finish_reason.startswith("failed")
    assert "context" in r.finish_reason and d.finishes["long"] == r.finish_reason
    assert d.core.num_waiting == 0 and d.schedule() is None


def test_prompt_larger_than_any_kv_cache_fails_at_add() -> None:
    d = Driver("vllm", [spec(num_blocks=4, block_size=16)])
    d.add("big", prompt=64, target=3)  # 65 tokens need 5 blocks
    assert d.finishes["big"].startswith("failed")
    assert d.core.requests["big"].status is Status.FAILED


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_remove_worker_requeues_its_requests_which_finish_elsewhere(policy: str) -> None:
    # first-idle: both requests start on w0, the worker this test removes.
    specs = [spec(num_blocks=64, wid="w0"), spec(num_blocks=64, wid="w1")]
    d = Driver(policy, specs, placement="first-idle")
    d.add("a", prompt=20, target=10)
    d.add("b", prompt=20, target=10)
    plan = d.schedule("w0")
    d.apply(d.result(plan))
    plan = d.schedule("w0")  # in flight when the worker dies
    on_w0 = {s.request_id for s in plan.seqs}
    assert on_w0 == {"a", "b"}
    events = d.core.remove_worker("w0", d.now)
    d.record(events)
    assert {e.request_id for e in events} == on_w0
    assert all(isinstance(e, PreemptEvent) for e in events)
    for rid in on_w0:
        r = d.core.requests[rid]
        assert r.status is Status.WAITING and r.worker_id is None and r.num_computed == 0
    assert d.core.num_waiting == 2
    assert d.core.update(d.result(plan), d.now) == []  # the dead worker's late result
    d.run()
    for rid in on_w0:
        assert d.core.requests[rid].status is Status.FINISHED
    assert {p.worker_id for p in d.plans[2:]} == {"w1"}
    d.check_done()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_step_error_preempts_and_the_third_failure_fails_the_request(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=64)])
    d.add("a", prompt=20, target=5)
    for attempt in range(1, 4):
        plan = d.schedule()
        assert [s.request_id for s in plan.seqs] == ["a"]
        events = d.apply(d.result(plan, error="CUDA OOM"))
        r = d.core.requests["a"]
        if attempt < 3:
            assert [type(e) for e in events] == [PreemptEvent]
            assert r.status is Status.WAITING and r.preemptions == attempt
            assert "CUDA OOM" in events[0].reason
        else:
            assert [type(e) for e in events] == [FinishEvent]
            assert events[0].reason.startswith("failed") and "CUDA OOM" in events[0].reason
            assert r.status is Status.FAILED and r.finish_reason == events[0].reason
    assert d.core.counters.step_errors == 3 and d.core.counters.failed == 1
    d.check_empty()
    assert d.schedule() is None


def test_step_error_midway_then_recovery_keeps_outputs() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=8)
    for _ in range(4):
        d.step()
    assert d.core.requests["a"].num_output == 4
    plan = d.schedule()
    d.apply(d.result(plan, error="worker hiccup"))
    assert d.core.requests["a"].num_output == 4 and d.core.requests["a"].status is Status.WAITING
    d.run()
    assert d.tokens["a"] == list(range(8))  # indices continue, none duplicated
    d.check_done()


def test_a_result_with_the_wrong_token_count_fails_the_step() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=3)
    plan = d.schedule()
    d.expected.pop(plan.step_id)
    events = d.apply(StepResult(plan.step_id, "w0", tokens=()))
    assert [type(e) for e in events] == [PreemptEvent]
    assert "token count" in events[0].reason
    d.run()
    d.check_done()


def test_a_result_for_an_unknown_step_is_ignored() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=3)
    plan = d.schedule()
    assert d.core.update(StepResult(plan.step_id + 100, "w0", tokens=(EOS,)), d.now) == []
    assert d.core.update(StepResult(plan.step_id, "nope", tokens=(EOS,)), d.now) == []
    assert d.core.workers["w0"].in_flight is plan
    assert d.core.requests["a"].num_output == 0
    d.apply(d.result(plan))
    assert d.core.update(StepResult(plan.step_id, "w0", tokens=(EOS,)), d.now) == []  # twice
    d.run()
    d.check_done()


def test_schedule_while_a_plan_is_in_flight_raises() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=3)
    plan = d.schedule()
    with pytest.raises(RuntimeError):
        d.core.schedule("w0", d.now)
    d.apply(d.result(plan))
    d.run()
    d.check_done()


def test_duplicate_request_id_and_worker_id_are_rejected() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=3)
    with pytest.raises(ValueError):
        d.add("a", prompt=20, target=3)
    with pytest.raises(ValueError):
        d.core.add_worker(spec(num_blocks=8))


def test_unknown_policy_name() -> None:
    with pytest.raises(ValueError):
        make_policy("nope")


def test_stats_report_counters_and_kv() -> None:
    d = Driver("ecoserve", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=3)
    d.step()
    s = d.core.stats()
    assert s["policy"] == "ecoserve" and s["running"] == {"w0": 1} and s["waiting"] == 0
    assert s["kv"]["w0"]["tokens_written"] == 20 and s["kv"]["w0"]["blocks_used"] >= 2
    assert s["admitted"] == 1 and s["steps"] == 1
    d.run()
    s = d.core.stats()
    assert s["finished"] == 1 and s["kv"]["w0"]["blocks_used"] == 0


def test_release_forgets_only_done_requests() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=1)
    d.add("b", prompt=20, target=5)
    d.step()
    d.core.release("a")
    d.core.release("b")
    assert "a" not in d.core.requests and "b" in d.core.requests
