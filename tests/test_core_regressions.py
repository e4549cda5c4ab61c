"""Regressions of the scheduler core (each of these once failed)."""

from __future__ import annotations

import pytest
from test_core_driver import (
    EOS,
    POLICY_NAMES,
    TOKEN,
    Driver,
    ledger_of,
    make_result,
    spec,
)

from ecoserve_scheduler.core import (
    Request,
    SchedulerCore,
    Status,
    WorkerSpec,
    make_policy,
)

# ---- regressions (each of these once failed) ------------------------------------------------


@pytest.mark.parametrize("policy", ["vllm", "sjf", "ecoserve"])
def test_a_preempted_decode_is_not_readmitted_into_the_same_step(policy: str) -> None:
    # 3 blocks of 4 tokens, budget 4. At step 4 b needs a third block and a (already scheduled
    # as a decode) is preempted. It used to be re-admitted as a prefill chunk in the same step:
    # scheduled twice (a decode at position 0 plus a chunk [0, 2)), with a bogus token appended.
    core = SchedulerCore(make_policy(policy))
    core.add_worker(WorkerSpec("w0", num_blocks=3, block_size=4, token_budget=4))
    for rid in "ab":
        core.add(Request(rid, prompt_len=1, arrival_s=0.0, eos_token_id=EOS, predicted_rl=1), 0.0)
    for step in range(8):
        plan = core.schedule("w0", float(step)).plan
        if plan is None:
            break
        ids = [s.request_id for s in plan.seqs]
        assert len(ids) == len(set(ids)), f"step {step}: {ids}"
        for s in plan.seqs:
            r = core.requests[s.request_id]
            if s.request_id in plan.decodes.request_ids:  # right after what is in the cache
                assert s.start_pos == r.num_tokens - 1 > 0
        core.update(make_result(plan, dict.fromkeys(plan.sampled_ids(), TOKEN)), step + 0.5)
        for r in core.requests.values():
            assert r.num_output <= step + 1


def test_ecoserve_preempted_decode_is_scheduled_once() -> None:
    # 7 blocks of 4. r1 (predicted 2, true 28) outgrows its reservation at step 6; its growth
    # preempts r0, which was already scheduled as a decode (it used to come back in the same
    # step as both a decode at position 0 and a prefill [0, 9)).
    d = Driver(
        "ecoserve",
        [spec(num_blocks=7, block_size=4, token_budget=64)],
        reserve_share=0.0,
        lend_margin_tokens=0,
        collision_lookahead=0,
    )
    d.add("r0", prompt=3, target=9, predicted=9)
    d.add("r1", prompt=3, target=28, predicted=2)  # 31 tokens never fit 28
    d.run(100)
    assert d.core.requests["r0"].status is Status.FINISHED
    assert d.core.requests["r0"].num_output == 9
    assert d.finishes["r1"].startswith("failed")
    d.check_empty()


def test_ecoserve_extension_does_not_preempt_when_the_exact_need_fits() -> None:
    # 10 blocks of 16: a reserves 2 (16 + 16 tokens) and needs 3 (16 + 20); b reserves 7.
    # One block stays free: enough for a. Its extension used to ask for need + 32 tokens
    # (5 blocks) and preempt b instead.
    d = Driver(
        "ecoserve", [spec(num_blocks=10, block_size=16, token_budget=256)], reserve_share=0.0
    )
    d.add("a", prompt=16, target=20, predicted=16)
    d.add("b", prompt=16, target=90, predicted=96)
    d.step()
    assert [len(ledger_of(d).table(k)) for k in "ab"] == [2, 7] and ledger_of(d).num_free == 1
    d.run()
    d.check_done()
    assert d.core.counters.preemptions == 0 and d.core.counters.extensions >= 1


def test_ecoserve_lone_under_predicted_request_that_fits_finishes() -> None:
    # 23 of 36 tokens. It used to ask for need + 32 tokens, preempt itself, and fail on
    # re-admission with its re-bucketed prediction.
    d = Driver("ecoserve", [spec(num_blocks=9, block_size=4, token_budget=64)], reserve_share=0.0)
    d.add("a", prompt=3, target=20, predicted=2)
    d.run(200)
    d.check_done()
    assert d.core.counters.preemptions == 0


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_request_outgrowing_the_kv_cache_fails_with_a_reason(policy: str) -> None:
    # 10 blocks of 16 = 160 tokens; the prompt fits, prompt + output (250) does not. vLLM and
    # SJF used to preempt and recompute it forever.
    d = Driver(policy, [spec(num_blocks=10, block_size=16, token_budget=64)])
    d.add("big", prompt=100, target=150, predicted=20, max_tokens=200)
    d.add("small", prompt=10, target=5)
    d.run(max_steps=2000)
    r = d.core.requests["big"]
    assert r.status is Status.FAILED and r.finish_reason.startswith("failed"), r.finish_reason
    assert d.finishes["big"] == r.finish_reason
    assert d.core.requests["small"].status is Status.FINISHED
    d.check_empty()


def test_sarathi_prompt_within_the_watermark_gap_ends() -> None:
    # 99 of 100 blocks plus the 1% watermark: it used to wait forever, blocking b behind it.
    d = Driver("sarathi", [spec(num_blocks=100, block_size=16, token_budget=512)])
    d.add("a", prompt=1590, target=5, max_tokens=8)
    d.add("b", prompt=10, target=5)
    d.run(max_steps=500)
    d.check_done()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_request_too_big_for_one_worker_runs_on_the_bigger_one(policy: str) -> None:
    # It used to fail on the small worker although the big one could hold it.
    d = Driver(policy, [spec(num_blocks=8, wid="small"), spec(num_blocks=64, wid="big")])
    d.add("a", prompt=300, target=5, max_tokens=8)
    d.add("b", prompt=20, target=5)
    d.run()
    d.check_done()
    assert {s.request_id for p in d.plans if p.worker_id == "big" for s in p.seqs} >= {"a"}


def test_no_per_request_state_survives_release() -> None:
    d = Driver("ecoserve", [spec(num_blocks=64)])
    for i in range(3):
        d.add(f"waiting{i}", prompt=10, target=5, deadline=100.0)
    d.add("running", prompt=10, target=50)
    d.add("failing", prompt=10, target=50)
    d.step()
    for i in range(3):
        d.abort(f"waiting{i}")
    d.abort("running")
    for _ in range(3):
        plan = d.schedule()
        if plan is not None:
            d.apply(d.result(plan, error="boom"))
    d.run()
    assert d.core.requests["failing"].status is Status.FAILED
    for rid in list(d.core.requests):
        d.core.release(rid)
    assert not d.core.requests
    assert not d.core._step_failures
    assert not d.core.policy.queue._latest  # type: ignore[attr-defined]
