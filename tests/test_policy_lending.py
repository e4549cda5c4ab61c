"""EcoServe component (b): KV lending from a decoding host's unused reservation tail."""

from __future__ import annotations

from test_policy_components import req, step_of

from ecoserve_scheduler.core import Status
from ecoserve_scheduler.core.policies.lending import KVLending, LendingConfig


def host_step(tail_blocks: int = 10):
    s = step_of(num_blocks=16, token_budget=64)
    h = req("h", prompt=16, predicted=200)
    h.status, h.num_computed = Status.RUNNING, 16  # decoding: one token pending
    h.output_token_ids.append(1)
    s.running["h"] = h
    s.ledger.allocate("h", 2 + tail_blocks)
    s.ledger.advance("h", 16)
    return s


def test_lends_the_far_tail_of_a_decoding_host() -> None:
    s = host_step()
    lend = KVLending(LendingConfig(), reserved_rl=lambda r: 8)
    assert lend.lend(s, req("g", prompt=32, predicted=8), 3)
    assert s.ledger.is_guest("g") and s.ledger.host_of("g") == "h"


def test_no_loan_when_the_host_would_reach_it_first() -> None:
    s = host_step(tail_blocks=4)
    lend = KVLending(LendingConfig(), reserved_rl=lambda r: 100)
    assert not lend.lend(s, req("g", prompt=32, predicted=100), 3)


def test_max_hosts_scanned_bounds_the_search() -> None:
    s = host_step()
    lend = KVLending(LendingConfig(max_hosts_scanned=0), reserved_rl=lambda r: 8)
    assert not lend.lend(s, req("g", prompt=32, predicted=8), 3)
    assert lend.collision_lookahead == LendingConfig().collision_lookahead == 2
