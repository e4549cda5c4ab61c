"""EcoServe's overcommit: a request with a TTFT target whose reservation does not fit joins on
demand, taking blocks from running reservations' unwritten tails (core/admit.py, reservation.py).
The driver's shadow KV cache checks that no trimmed block still held a token."""

from __future__ import annotations

import pytest
from test_core_driver import Driver, ledger_of, spec
from test_policy_components import req, step_of

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


def burst(ttft: float | None, tpot: float | None = None, **options) -> Driver:
    """12 requests of prompt 48 + 80 outputs (8 blocks each reserved) on 64 blocks (no
    reserve pool, so that 8 reservations fill the cache exactly)."""
    options.setdefault("reserve_share", 0.0)
    d = Driver("ecoserve", [spec(num_blocks=64, block_size=16, token_budget=1024)], **options)
    for i in range(12):
        d.add(f"r{i}", prompt=48, target=80, predicted=80, ttft=ttft, tpot=tpot)
    return d


def test_a_burst_with_ttft_targets_all_start_at_once() -> None:
    d = burst(ttft=1.0, overcommit_share=1.0)  # a peak of 12 x 9 blocks <= 2 x 64
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


def test_overcommit_share_bounds_the_projected_peak() -> None:
    # All start together, so the peak is every request whole: 9 blocks each (8 + a part-filled
    # last block); (1 + share) x 64 blocks: 0.5 -> 96 -> 10 requests, 0.25 -> 80 -> 8.
    for share, admitted in ((0.5, 10), (0.25, 8), (0.0, 8)):
        d = burst(ttft=1.0, overcommit_share=share)
        d.schedule()
        assert len(d.core.workers["w0"].running) == admitted, share


def test_the_projected_peak_counts_who_ends_before_whom() -> None:
    """Two running requests (prompt 32, 10 of 40 written; prompt 100, 90 of 100 written) and a
    new one (prompt 64, 50 to go): the peak is 10 steps ahead, when the second is about to end
    (52 + 200 + 74 = 326 tokens -> 21 blocks, + 3 part-filled), not the sum of their final
    lengths (72 + 200 + 114 = 386 tokens)."""
    rsv = PaddedReservation(ReservationConfig(pad_weight=0.0))
    s = step_of(num_blocks=64)
    for rid, prompt, predicted, written in (("a", 32, 40, 10), ("b", 100, 100, 90)):
        r = req(rid, prompt=prompt, predicted=predicted)
        r.output_token_ids.extend([1] * written)
        r.num_computed = prompt + written
        s.running[rid] = r
    assert rsv.projected_peak(s, req("new", prompt=64, predicted=50)) == 21 + 3


def test_a_lost_bet_preempts_and_new_bets_go_on_while_the_victim_waits() -> None:
    d = burst(ttft=1.0, tpot=0.5)
    for _ in range(200):
        d.step()
        if d.core.counters.preemptions:
            break
    assert d.core.counters.preemptions > 0  # 12 x 128 tokens cannot all fit in 64 x 16
    victims = [r for r in d.core.requests.values() if r.preemptions and not r.status.done]
    assert victims and all(r.num_output > 0 for r in victims)
    d.add("late", prompt=16, target=4, predicted=4, ttft=1.0)
    while d.core.requests["late"].first_token_s is None:
        d.step()
    # The new request's TTFT target puts it before the victims, whose TPOT targets leave them
    # slack: it has its first token while a victim still waits to come back.
    assert any(v.status.name == "WAITING" for v in victims)
    d.run()
    d.check_done()


def test_only_first_admissions_with_a_ttft_target_overcommit() -> None:
    rsv = PaddedReservation(ReservationConfig())
    s = step_of(num_blocks=64)
    d = Driver("ecoserve")
    fresh, no_ttft = d.add("a", prompt=32, target=5, ttft=1.0), d.add("b", prompt=32, target=5)
    assert rsv.overcommits(s, fresh) and not rsv.overcommits(s, no_ttft)
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


@pytest.mark.parametrize("pass_victims", [False, True])
def test_a_victim_that_does_not_fit_blocks_the_queue_unless_victims_pass(pass_victims) -> None:
    """A victim at the queue head (its TPOT slack is the least) waits for a whole reservation;
    with pass_victims a request behind it with a far TTFT target may still overcommit."""
    d = burst(ttft=1.0, tpot=0.5, pass_victims=pass_victims)
    for _ in range(200):
        d.step()
        if d.core.counters.preemptions:
            break
    assert d.core.counters.preemptions > 0
    d.add("patient", prompt=16, target=4, predicted=4, ttft=1000.0)
    started = False
    for _ in range(30):  # while a victim still waits (none comes back within these steps)
        d.step()
        assert any(r.preemptions and r.status.name == "WAITING" for r in d.core.requests.values())
        started = started or d.core.requests["patient"].status.name != "WAITING"
    assert started == pass_victims
    d.run()
    d.check_done()
