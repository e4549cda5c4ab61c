"""EcoServe's components in the core: reservation and padding, extensions, KVCPipe loans and
collisions, SLO ordering and the late queue."""

from __future__ import annotations

from test_core_driver import (
    Driver,
    ecoserve_host_and_guest,
    ledger_of,
    spec,
)

from ecoserve_scheduler.core import Status

# ---- EcoServe --------------------------------------------------------------------------------


def test_ecoserve_reserves_prompt_plus_padded_prediction() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, block_size=16, token_budget=512)], pad_weight=1.0)
    d.add("a", prompt=30, target=5, predicted=40, upper=70)
    d.add("b", prompt=100, target=5, predicted=10, upper=10, max_tokens=200)
    d.add("c", prompt=20, target=5, predicted=500, upper=600, max_tokens=50)  # capped at max_tokens
    d.schedule()
    ledger = ledger_of(d)
    assert len(ledger.table("a")) == ledger.blocks_for(30 + 70)
    assert len(ledger.table("b")) == ledger.blocks_for(100 + 10)
    assert len(ledger.table("c")) == ledger.blocks_for(20 + 50)


def test_ecoserve_default_pad_is_halfway_to_the_upper_quantile() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, block_size=16)])
    d.add("a", prompt=30, target=5, predicted=40, upper=120)
    d.schedule()
    assert len(ledger_of(d).table("a")) == ledger_of(d).blocks_for(30 + 80)


def test_ecoserve_pad_weight_zero_reserves_the_point_prediction() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, block_size=16)], pad_weight=0.0)
    d.add("a", prompt=30, target=5, predicted=40, upper=70)
    d.schedule()
    assert len(ledger_of(d).table("a")) == ledger_of(d).blocks_for(30 + 40)


def test_ecoserve_extends_on_under_prediction_without_preempting() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, block_size=16)])
    r = d.add("a", prompt=20, target=150, predicted=4, upper=6, max_tokens=400)
    d.add("b", prompt=20, target=40, predicted=40)
    plan = d.schedule()
    assert len(ledger_of(d).table("a")) == ledger_of(d).blocks_for(26)
    d.apply(d.result(plan))
    d.run()
    assert d.core.counters.extensions > 0 and r.extensions > 0
    assert d.core.counters.preemptions == 0
    assert r.predicted_rl_upper > 100  # re-bucketed to what it has reserved
    d.check_done()


def test_ecoserve_extension_uses_the_reserve_pool_before_preempting() -> None:
    # 20 blocks of 16, reserve int(20 * 0.2) = 4 blocks. a reserves 16 + 16 = 2 blocks, b takes
    # the rest of the fresh blocks; a's overrun can only come from the reserve pool.
    d = Driver("ecoserve", [spec(num_blocks=20, block_size=16)], reserve_share=0.2)
    a = d.add("a", prompt=16, target=60, predicted=16, max_tokens=80)
    d.add("b", prompt=16, target=200, predicted=200, upper=208)
    plan = d.schedule()
    ledger = ledger_of(d)
    assert ledger.num_free == 0 and ledger.num_free_total == 4
    d.apply(d.result(plan))
    d.run()
    assert a.extensions > 0 and d.core.counters.preemptions == 0
    d.check_done()


def test_ecoserve_lends_a_hosts_tail_when_fresh_blocks_are_short() -> None:
    d, ledger = ecoserve_host_and_guest()
    host_table = list(ledger.table("h"))
    d.step()
    assert d.core.counters.loans == 1
    assert ledger.is_guest("g") and ledger.host_of("g") == "h"
    assert ledger.table("g") == host_table[11:14]  # the host's tail run
    assert ledger.writable("h") == 11 * 16
    assert ledger.num_free == 2  # the loan took no fresh blocks
    assert d.core.stats()["kv"]["w0"]["blocks_lent"] == 3
    d.run()
    assert d.core.counters.preemptions == 0
    d.check_done()


def test_ecoserve_without_pipelining_makes_the_guest_wait() -> None:
    d = Driver("ecoserve", [spec(num_blocks=16, block_size=16, token_budget=64)], pipelining=False)
    d.add("h", prompt=16, target=150, predicted=200)
    d.step()
    d.add("g", prompt=32, target=8, predicted=8)
    d.step()
    assert d.core.requests["g"].status is Status.WAITING
    d.run()
    assert d.core.counters.loans == 0
    assert d.core.requests["g"].admitted_s > d.core.requests["h"].finished_s - 1e-9
    d.check_done()


def ecoserve_collision(reserve_share: float, num_blocks: int) -> Driver:
    """A guest's prefill is slower than predicted (decodes eat the budget), so the host reaches
    the lent blocks while the guest still lives there.

    Block size 4, budget 8. h reserves 4 + 56 = 15 blocks, d0..d2 9 blocks each; 5 fresh blocks
    stay free. g (prompt 40, predicted 1) needs 11 blocks, so it borrows h[4:15]: h may write 16
    tokens. g's prefill is predicted to take 40 / 8 = 5 iterations but gets 8 - 4 decodes = 4
    tokens per iteration, so h reaches token 16 before g is done."""
    d = Driver(
        "ecoserve",
        [spec(num_blocks=num_blocks, block_size=4, token_budget=8)],
        reserve_share=reserve_share,
        lend_margin_tokens=0,
    )
    d.add("h", prompt=4, target=100, predicted=56)
    for i in range(3):
        d.add(f"d{i}", prompt=4, target=30, predicted=30)
    for _ in range(3):
        d.step()
    ledger = ledger_of(d)
    assert [len(ledger.table(k)) for k in ("h", "d0", "d1", "d2")] == [15, 9, 9, 9]
    assert ledger.num_free == 5
    d.add("g", prompt=40, target=2, predicted=1)
    d.step()
    assert ledger.loan("g").host_id == "h" and ledger.loan("g").start == 4
    return d


def test_ecoserve_moves_the_guest_before_the_host_reaches_it() -> None:
    d = ecoserve_collision(reserve_share=0.205, num_blocks=59)  # 12 reserve blocks to move to
    ledger = ledger_of(d)
    old = list(ledger.table("g"))
    while ledger.is_guest("g"):
        assert ledger.written("h") <= ledger.loan("g").start * 4  # checked by ledger.check too
        assert not d.core.requests["g"].status.done
        d.step()
    assert d.core.counters.guest_moves == 1 and d.core.counters.guest_preemptions == 0
    moving_plan = d.plans[-1]
    (g_seq,) = [s for s in moving_plan.seqs if s.request_id == "g"]
    new = list(g_seq.block_table)
    # the 10 blocks holding g's 40 tokens are copied to its new blocks, outside h's table
    assert list(moving_plan.block_copies) == list(zip(old[:10], new[:10], strict=True))
    assert not set(new) & set(ledger.table("h"))
    d.run()  # the shadow cache checks that g's tokens were copied where its new table points
    assert d.core.counters.preemptions == 0
    d.check_done()


def test_ecoserve_preempts_the_guest_when_it_cannot_move() -> None:
    d = ecoserve_collision(reserve_share=0.0, num_blocks=47)  # no reserve: nowhere to move
    d.run()
    assert d.core.counters.guest_preemptions == 1 and d.core.counters.guest_moves == 0
    assert [(e.request_id, e.reason.startswith("KVCPipe collision")) for e in d.preempts] == [
        ("g", True)
    ]
    d.check_done()


def test_ecoserve_puts_an_urgent_request_ahead_of_a_relaxed_one() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, block_size=16, token_budget=512)])
    d.add("relaxed", prompt=10, target=5, predicted=5)
    d.now += 0.01
    d.add("urgent", prompt=10, target=80, predicted=80, deadline=30.0)
    plan = d.schedule()
    assert [s.request_id for s in plan.seqs] == ["urgent", "relaxed"]
    d.apply(d.result(plan))
    d.run()
    d.check_done()


def test_ecoserve_without_ordering_is_fcfs() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, token_budget=512)], ordering=False)
    d.add("relaxed", prompt=10, target=5, predicted=5)
    d.now += 0.01
    d.add("urgent", prompt=10, target=80, predicted=80, deadline=30.0)
    plan = d.schedule()
    assert [s.request_id for s in plan.seqs] == ["relaxed", "urgent"]


def test_ecoserve_serves_late_requests_after_on_time_ones() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, token_budget=512)])
    d.now = 10.0
    d.add("late", prompt=10, target=5, predicted=5, deadline=5.0)  # already past its deadline
    d.add("ontime", prompt=10, target=50, predicted=50, deadline=100.0)
    plan = d.schedule()
    assert [s.request_id for s in plan.seqs] == ["ontime", "late"]
    d.apply(d.result(plan))
    d.run()
    d.check_done()
