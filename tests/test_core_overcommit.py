"""EcoServe's overcommit: a request with a TTFT target whose reservation does not fit joins on
demand, taking blocks from running reservations' unwritten tails (core/admit.py, reservation.py).
The driver's shadow KV cache checks that no trimmed block still held a token."""

from __future__ import annotations

import pytest
from test_core_driver import Driver, ledger_of, spec
from test_policy_components import step_of

from ecoserve_scheduler.core import KVLedger
from ecoserve_scheduler.core.ledger import LedgerError
from ecoserve_scheduler.core.policies.reservation import PaddedReservation, ReservationConfig


def test_trim_frees_the_unwritten_tail_only() -> None:
    ledger = KVLedger(16, 16)
    ledger.allocate("a", 8)
    ledger.advance("a", 40)  # 3 blocks written
    assert ledger.trim("a", 1) == 5  # never below what is written
    assert len(ledger.table("a")) == 3 and ledger.num_free == 13
    assert ledger.trim("a", 3) == 0
    ledger.check()
    with pytest.raises(LedgerError):
        ledger.advance("a", 49)  # past the trimmed table


def test_trim_leaves_loans_alone() -> None:
    ledger = KVLedger(16, 16)
    ledger.allocate("h", 10)
    ledger.advance("h", 16)
    ledger.lend("h", "g", 3, min_start=4)
    assert ledger.trim("h", 2) == 0 and ledger.trim("g", 1) == 0
    ledger.check()


def burst(ttft: float | None, **options) -> Driver:
    """12 requests of prompt 48 + 80 outputs (8 blocks each reserved) on 64 blocks (no
    reserve pool, so that 8 reservations fill the cache exactly)."""
    options.setdefault("reserve_share", 0.0)
    d = Driver("ecoserve", [spec(num_blocks=64, block_size=16, token_budget=1024)], **options)
    for i in range(12):
        d.add(f"r{i}", prompt=48, target=80, predicted=80, ttft=ttft)
    return d


def test_a_burst_with_ttft_targets_all_start_at_once() -> None:
    d = burst(ttft=1.0)
    plan = d.schedule()
    assert plan is not None and len(d.core.workers["w0"].running) == 12
    assert d.core.counters.overcommits == 12 - 64 // 8
    d.apply(d.result(plan))
    d.run()
    d.check_done()  # every one finished whole, preempted or not, and the cache is empty


def test_without_a_ttft_target_the_reservations_bound_admission() -> None:
    d = burst(ttft=None)
    plan = d.schedule()
    assert plan is not None and len(d.core.workers["w0"].running) == 64 // 8
    assert d.core.counters.overcommits == 0
    d.apply(d.result(plan))
    d.run()
    d.check_done()


def test_overcommit_share_bounds_the_claims() -> None:
    # Claims may reach (1 + share) x 64 blocks: share 0.25 -> 80 blocks = 10 requests of 8.
    d = burst(ttft=1.0, overcommit_share=0.25)
    d.schedule()
    assert len(d.core.workers["w0"].running) == 10
    d = burst(ttft=1.0, overcommit_share=0.0)
    d.schedule()
    assert len(d.core.workers["w0"].running) == 8


def test_a_lost_bet_preempts_and_stops_overcommitting_until_the_victim_is_back() -> None:
    d = burst(ttft=1.0)
    for _ in range(200):
        d.step()
        if d.core.counters.preemptions:
            break
    assert d.core.counters.preemptions > 0  # 12 x 128 tokens cannot all fit in 64 x 16
    assert d.core.num_requeued > 0
    d.add("late", prompt=48, target=4, predicted=4, ttft=1.0)
    before = d.core.counters.overcommits
    d.step()
    assert d.core.counters.overcommits == before  # no new bet while a victim waits
    d.run()
    d.check_done()
    assert d.core.num_requeued == 0


def test_only_first_admissions_with_a_ttft_target_overcommit() -> None:
    rsv = PaddedReservation(ReservationConfig())
    s = step_of(num_blocks=64)
    d = Driver("ecoserve")
    fresh, no_ttft = d.add("a", prompt=32, target=5, ttft=1.0), d.add("b", prompt=32, target=5)
    assert rsv.overcommits(s, fresh) and not rsv.overcommits(s, no_ttft)
    s.requeued = 1  # a victim waits: no new bet
    assert not rsv.overcommits(s, fresh)
    s.requeued = 0
    fresh.output_token_ids.append(1)  # a preempted request comes back through a reservation
    assert not rsv.overcommits(s, fresh)


def test_trimmed_requests_grow_on_demand_afterwards() -> None:
    d = burst(ttft=1.0)
    d.schedule()
    ledger = ledger_of(d)
    trimmed = [r for r in d.core.workers["w0"].running.values() if r.on_demand]
    assert trimmed, "the overcommitted and the trimmed run on demand"
    r = trimmed[0]
    assert d.core.policy.admission.growth_tokens(r, r.num_computed + 1) == r.num_computed + 1
    assert len(ledger.table(r.request_id)) < ledger.blocks_for(48 + 80)
