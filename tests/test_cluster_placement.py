"""Placement: which worker a waiting prompt task runs on (core/placement.py)."""

from __future__ import annotations

import pytest

from ecoserve_scheduler.core import (
    PLACEMENTS,
    Request,
    SamplingParams,
    SchedulerCore,
    StepResult,
    WorkerSpec,
    make_placement,
    make_policy,
)
from ecoserve_scheduler.core.placement import FirstIdle, LeastLoaded


def req(i: int, prompt: int = 32, rl: int = 16, now: float = 0.0) -> Request:
    return Request(
        f"r{i}",
        prompt,
        now,
        SamplingParams(max_tokens=256),
        eos_token_id=0,
        predicted_rl=rl,
        predicted_rl_upper=rl,
    )


def cluster(policy: str, workers: int, placement=None, num_blocks: int = 256) -> SchedulerCore:
    core = SchedulerCore(make_policy(policy), placement)
    for w in range(workers):
        core.add_worker(WorkerSpec(f"w{w}", num_blocks=num_blocks, token_budget=256))
    return core


def admitted_on(core: SchedulerCore) -> dict[str, int]:
    return {wid: len(w.running) for wid, w in core.workers.items()}


def test_registry_and_default() -> None:
    assert set(PLACEMENTS) == {"first-idle", "least-loaded"}
    assert isinstance(make_placement("first-idle"), FirstIdle)
    with pytest.raises(ValueError, match="unknown placement"):
        make_placement("random")
    core = SchedulerCore(make_policy("vllm"))
    assert core.placement.name == "least-loaded" and core.stats()["placement"] == "least-loaded"
    assert SchedulerCore(make_policy("vllm"), "first-idle").placement.name == "first-idle"
    mine = LeastLoaded(tolerance=0.2)
    assert SchedulerCore(make_policy("vllm"), mine).placement is mine


@pytest.mark.parametrize("policy", ["ecoserve", "vllm"])
def test_least_loaded_spreads_a_burst_first_idle_piles_it_up(policy: str) -> None:
    for placement, expected in (("least-loaded", [1, 1, 1, 1]), ("first-idle", [4, 0, 0, 0])):
        core = cluster(policy, 4, placement)
        for i in range(4):
            core.add(req(i), 0.0)
        for wid in sorted(core.workers):
            core.schedule(wid, 0.0)
        assert list(admitted_on(core).values()) == expected, placement
        assert core.num_waiting == 0


def test_least_loaded_sends_work_away_from_a_worker_whose_kv_is_held() -> None:
    core = cluster("ecoserve", 2, "least-loaded", num_blocks=64)
    core.add(req(0, prompt=600, rl=300), 0.0)  # 57 of w0's 64 blocks; chunks 256, 256, 88
    for t in (0.0, 0.01):
        plan = core.schedule("w0", t).plan
        core.update(StepResult(plan.step_id, "w0", []), t + 0.01)
    assert admitted_on(core) == {"w0": 1, "w1": 0}
    core.add(req(1), 0.02)  # fits w0's 7 free blocks and its leftover budget, yet:
    assert core.schedule("w0", 0.02).plan is not None  # w0 runs its last chunk and defers r1
    assert admitted_on(core) == {"w0": 1, "w1": 0} and core.num_waiting == 1
    core.schedule("w1", 0.02)
    assert admitted_on(core) == {"w0": 1, "w1": 1}
    assert core.placement.deferrals >= 1


def test_a_deferred_head_is_taken_anyway_after_patience() -> None:
    core = cluster("vllm", 2, LeastLoaded(patience_s=0.5))
    core.add(req(0), 0.0)
    core.schedule("w0", 0.0)  # w0 now holds r0; w1 is empty but never schedules (say, slow)
    core.add(req(1), 0.0)
    core.workers["w0"].in_flight = None  # pretend w0's step came back
    core.schedule("w0", 0.1)
    assert core.num_waiting == 1  # deferred to w1
    core.workers["w0"].in_flight = None
    core.schedule("w0", 0.7)
    assert core.num_waiting == 0 and admitted_on(core) == {"w0": 2, "w1": 0}


def test_a_single_worker_never_defers() -> None:
    core = cluster("ecoserve", 1, "least-loaded")
    for i in range(3):
        core.add(req(i), 0.0)
    core.schedule("w0", 0.0)
    assert core.num_waiting == 0
