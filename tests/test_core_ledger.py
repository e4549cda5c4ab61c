"""Unit tests of KVLedger: block conservation, reserve pool, writable limits, KVCPipe loans."""

from __future__ import annotations

import pytest

from ecoserve_scheduler.core.ledger import KVLedger, LedgerError, blocks_for


def all_blocks(ledger: KVLedger, *owners: str) -> list[int]:
    """Free blocks plus the owners' tables, sorted: must be exactly range(num_blocks)."""
    blocks = list(ledger._free)
    for o in owners:
        blocks += ledger.table(o)
    return sorted(blocks)


# ---- construction and simple queries ---------------------------------------------------------


def test_constructor_validates_arguments() -> None:
    with pytest.raises(ValueError):
        KVLedger(0, 16)
    with pytest.raises(ValueError):
        KVLedger(8, 0)
    with pytest.raises(ValueError):
        KVLedger(8, 16, reserve_blocks=8)
    with pytest.raises(ValueError):
        KVLedger(8, 16, reserve_blocks=-1)


def test_blocks_for_rounds_up() -> None:
    assert blocks_for(0, 16) == 0
    assert blocks_for(1, 16) == 1
    assert blocks_for(16, 16) == 1
    assert blocks_for(17, 16) == 2
    assert KVLedger(4, 4).blocks_for(9) == 3


# ---- owners: allocate / extend / advance / free ---------------------------------------------


def test_allocate_extend_free_conserve_blocks() -> None:
    ledger = KVLedger(10, 4)
    a = ledger.allocate("a", 3)
    b = ledger.allocate("b", 2)
    assert len(a) == 3 and len(b) == 2 and not set(a) & set(b)
    assert ledger.num_free == 5 and ledger.num_free_total == 5
    assert all_blocks(ledger, "a", "b") == list(range(10))
    assert ledger.extend("a", 4)
    assert len(ledger.table("a")) == 7 and ledger.num_free == 1
    assert all_blocks(ledger, "a", "b") == list(range(10))
    ledger.check()
    ledger.free("a")
    assert not ledger.has("a") and ledger.num_free == 8
    assert all_blocks(ledger, "b") == list(range(10))
    ledger.free("b")
    assert ledger.num_free == 10
    assert sorted(ledger._free) == list(range(10))
    ledger.check()


def test_freed_blocks_are_reused_first() -> None:
    ledger = KVLedger(10, 4)
    a = ledger.allocate("a", 2)
    ledger.free("a")
    assert ledger.allocate("b", 2) == a  # LIFO: the warm blocks come back in the same order


def test_allocate_failures_raise_and_change_nothing() -> None:
    ledger = KVLedger(4, 4)
    ledger.allocate("a", 3)
    with pytest.raises(LedgerError):
        ledger.allocate("b", 2)
    with pytest.raises(LedgerError):
        ledger.allocate("a", 1)  # already holds blocks
    assert not ledger.has("b") and ledger.num_free == 1
    ledger.check()


def test_extend_without_space_returns_false_and_changes_nothing() -> None:
    ledger = KVLedger(4, 4)
    ledger.allocate("a", 3)
    before = list(ledger.table("a"))
    assert not ledger.extend("a", 2)
    assert ledger.table("a") == before and ledger.num_free == 1
    assert ledger.extend("a", 1)
    assert ledger.num_free == 0
    ledger.check()


def test_reserve_pool_only_usable_with_use_reserve() -> None:
    ledger = KVLedger(10, 4, reserve_blocks=2)
    assert ledger.num_free == 8 and ledger.num_free_total == 10
    assert ledger.can_allocate(8) and not ledger.can_allocate(9)
    assert ledger.can_allocate(10, use_reserve=True)
    with pytest.raises(LedgerError):
        ledger.allocate("big", 9)
    ledger.allocate("a", 8)
    assert ledger.num_free == 0 and ledger.num_free_total == 2
    assert not ledger.extend("a", 1)  # the reserve is not for ordinary growth
    assert ledger.extend("a", 1, use_reserve=True)
    assert ledger.num_free == 0 and ledger.num_free_total == 1
    with pytest.raises(LedgerError):
        ledger.allocate("b", 1)
    ledger.allocate("b", 1, use_reserve=True)
    assert ledger.num_free_total == 0
    assert not ledger.extend("a", 1, use_reserve=True)
    ledger.check()


def test_advance_past_writable_raises() -> None:
    ledger = KVLedger(8, 4)
    ledger.allocate("a", 2)
    assert ledger.writable("a") == 8
    ledger.advance("a", 8)
    assert ledger.written("a") == 8
    with pytest.raises(LedgerError):
        ledger.advance("a", 9)
    assert ledger.written("a") == 8
    ledger.check()


def test_usage_counts_blocks_and_tokens() -> None:
    ledger = KVLedger(20, 4, reserve_blocks=2)
    u = ledger.usage()
    assert (u.num_blocks, u.blocks_used, u.blocks_lent, u.tokens_written) == (20, 0, 0, 0)
    assert u.reserve_blocks == 2 and u.reserved_share == 0.0
    ledger.allocate("a", 4)
    ledger.advance("a", 7)
    ledger.allocate("h", 8)
    ledger.advance("h", 3)
    ledger.lend("h", "g", 3, min_start=2)
    ledger.advance("g", 5)
    u = ledger.usage()
    assert u.blocks_used == 12  # a lent block is counted once, in its host
    assert u.blocks_lent == 3
    assert u.tokens_written == 7 + 3 + 5
    assert u.reserved_share == pytest.approx(12 / 20)
    ledger.advance("a", 2)  # advance may also shrink what is held
    assert ledger.usage().tokens_written == 2 + 3 + 5
    ledger.free("g")
    u = ledger.usage()
    assert (u.blocks_used, u.blocks_lent, u.tokens_written) == (12, 0, 5)
    ledger.free("a")
    ledger.free("h")
    u = ledger.usage()
    assert (u.blocks_used, u.blocks_lent, u.tokens_written) == (0, 0, 0)
    ledger.check()


# ---- KVCPipe loans ---------------------------------------------------------------------------


def test_lend_gives_the_guest_the_hosts_tail_and_cuts_host_writable() -> None:
    ledger = KVLedger(16, 4)
    host = list(ledger.allocate("h", 10))
    ledger.advance("h", 6)  # 2 blocks written
    free_before = ledger.num_free
    assert ledger.lendable("h", min_start=0) == 8
    assert ledger.lendable("h", min_start=5) == 5
    g = ledger.lend("h", "g", 3, min_start=5)
    assert g == host[7:10]
    assert ledger.table("g") == host[7:10]
    assert ledger.table("h") == host  # the host keeps the blocks in its own table
    assert ledger.num_free == free_before  # a loan costs no extra memory
    assert ledger.is_guest("g") and not ledger.is_guest("h")
    assert ledger.host_of("g") == "h" and ledger.guests_of("h") == ["g"]
    assert ledger.hosts() == ["h"]
    loan = ledger.loan("g")
    assert (loan.host_id, loan.start, loan.n_blocks) == ("h", 7, 3)
    assert ledger.writable("h") == 7 * 4
    assert ledger.writable("g") == 3 * 4
    ledger.advance("h", 28)
    with pytest.raises(LedgerError):
        ledger.advance("h", 29)
    ledger.advance("g", 12)
    with pytest.raises(LedgerError):
        ledger.advance("g", 13)
    ledger.check()


def test_second_loan_sits_below_the_first() -> None:
    ledger = KVLedger(16, 4)
    host = list(ledger.allocate("h", 10))
    ledger.lend("h", "g1", 3, min_start=0)
    assert ledger.lendable("h", min_start=2) == 5
    assert ledger.lend("h", "g2", 2, min_start=2) == host[5:7]
    assert ledger.guests_of("h") == ["g2", "g1"]  # lowest start first
    assert ledger.writable("h") == 5 * 4
    ledger.free("g2")
    assert ledger.writable("h") == 7 * 4
    ledger.check()


def test_lend_refuses_what_is_not_lendable() -> None:
    ledger = KVLedger(16, 4)
    ledger.allocate("h", 6)
    ledger.advance("h", 9)  # 3 blocks written: only 3 tail blocks can go
    assert ledger.lendable("h", min_start=0) == 3
    with pytest.raises(LedgerError):
        ledger.lend("h", "g", 4, min_start=0)
    with pytest.raises(LedgerError):
        ledger.lend("h", "g", 2, min_start=5)
    with pytest.raises(LedgerError):
        ledger.lend("h", "g", 0, min_start=0)
    ledger.allocate("x", 1)
    with pytest.raises(LedgerError):
        ledger.lend("h", "x", 1, min_start=0)  # x already holds blocks
    assert not ledger.is_guest("g") and not ledger.has("g")
    ledger.lend("h", "g", 2, min_start=4)
    assert ledger.lendable("g", 0) == 0  # guests never sub-lend
    ledger.check()


def test_host_and_guest_cannot_extend_in_place() -> None:
    ledger = KVLedger(16, 4)
    ledger.allocate("h", 6)
    ledger.lend("h", "g", 2, min_start=0)
    with pytest.raises(LedgerError):
        ledger.extend("h", 1)
    with pytest.raises(LedgerError):
        ledger.extend("g", 1)
    ledger.check()


def test_free_host_hands_the_loan_to_the_guest_and_frees_the_rest() -> None:
    ledger = KVLedger(16, 4)
    host = list(ledger.allocate("h", 10))
    ledger.advance("h", 8)
    ledger.lend("h", "g", 3, min_start=4)
    ledger.advance("g", 5)
    ledger.free("h")
    assert not ledger.has("h")
    assert not ledger.is_guest("g") and ledger.host_of("g") is None
    assert ledger.table("g") == host[7:10]  # same blocks, now owned
    assert ledger.written("g") == 5
    assert ledger.num_free == 16 - 3
    assert sorted(ledger._free) == sorted(set(range(16)) - set(host[7:10]))
    assert ledger.hosts() == [] and ledger.usage().blocks_lent == 0
    ledger.check()
    # The new owner can grow in place now.
    assert ledger.extend("g", 1)
    ledger.free("g")
    assert ledger.num_free == 16
    ledger.check()


def test_free_host_with_two_guests() -> None:
    ledger = KVLedger(16, 4)
    host = list(ledger.allocate("h", 10))
    ledger.lend("h", "g1", 2, min_start=0)
    ledger.lend("h", "g2", 3, min_start=0)
    ledger.free("h")
    assert ledger.table("g1") == host[8:10] and ledger.table("g2") == host[5:8]
    assert ledger.num_free == 16 - 5
    ledger.check()


def test_free_guest_returns_blocks_to_the_host() -> None:
    ledger = KVLedger(16, 4)
    host = list(ledger.allocate("h", 10))
    ledger.lend("h", "g", 3, min_start=0)
    ledger.advance("g", 9)
    free_before = ledger.num_free
    ledger.free("g")
    assert not ledger.has("g")
    assert ledger.table("h") == host
    assert ledger.num_free == free_before  # nothing went to the free list
    assert ledger.writable("h") == 40 and ledger.guests_of("h") == []
    assert ledger.hosts() == []
    ledger.advance("h", 40)
    assert ledger.usage().tokens_written == 40
    ledger.check()


def test_move_guest_copies_only_written_blocks() -> None:
    ledger = KVLedger(20, 4)
    host = list(ledger.allocate("h", 10))
    old = ledger.lend("h", "g", 4, min_start=0)
    assert old == host[6:10]
    ledger.advance("g", 6)  # 2 blocks hold tokens
    free_before = ledger.num_free
    copies = ledger.move_guest("g", 5)
    new = ledger.table("g")
    assert len(new) == 5 and not set(new) & set(host)
    assert copies == [(old[0], new[0]), (old[1], new[1])]
    assert not ledger.is_guest("g") and ledger.guests_of("h") == []
    assert ledger.written("g") == 6
    assert ledger.num_free == free_before - 5
    assert ledger.writable("h") == 40  # the host has its whole table back
    ledger.check()


def test_move_guest_with_nothing_written_copies_nothing() -> None:
    ledger = KVLedger(20, 4)
    ledger.allocate("h", 10)
    ledger.lend("h", "g", 2, min_start=0)
    assert ledger.move_guest("g", 2) == []
    assert len(ledger.table("g")) == 2 and not ledger.is_guest("g")
    ledger.check()


def test_move_guest_never_shrinks_below_written() -> None:
    ledger = KVLedger(20, 4)
    ledger.allocate("h", 10)
    old = ledger.lend("h", "g", 3, min_start=0)
    ledger.advance("g", 10)  # 3 blocks
    copies = ledger.move_guest("g", 1)
    assert len(ledger.table("g")) == 3
    assert [s for s, _ in copies] == old
    ledger.check()


def test_move_guest_without_space_fails_cleanly() -> None:
    ledger = KVLedger(12, 4, reserve_blocks=2)
    host = list(ledger.allocate("h", 10))
    old = ledger.lend("h", "g", 3, min_start=0)
    ledger.advance("g", 5)
    assert ledger.num_free == 0 and ledger.num_free_total == 2
    assert ledger.move_guest("g", 3, use_reserve=True) is None
    assert ledger.move_guest("g", 2, use_reserve=False) is None
    # no change at all
    assert ledger.is_guest("g") and ledger.table("g") == old and ledger.written("g") == 5
    assert ledger.table("h") == host and ledger.num_free_total == 2
    ledger.check()
    # with the reserve it fits
    copies = ledger.move_guest("g", 2, use_reserve=True)
    assert copies is not None and len(copies) == 2
    assert ledger.num_free_total == 0 and not ledger.is_guest("g")
    ledger.check()


def test_move_guest_of_a_non_guest_raises() -> None:
    ledger = KVLedger(8, 4)
    ledger.allocate("a", 2)
    with pytest.raises(LedgerError):
        ledger.move_guest("a", 2)


def test_moving_the_lower_guest_leaves_the_upper_loan_in_place() -> None:
    ledger = KVLedger(20, 4)
    host = list(ledger.allocate("h", 10))
    ledger.lend("h", "g1", 2, min_start=0)  # host[8:10]
    ledger.lend("h", "g2", 2, min_start=0)  # host[6:8]
    assert ledger.writable("h") == 24
    assert ledger.move_guest("g2", 2) == []
    assert ledger.guests_of("h") == ["g1"]
    assert ledger.writable("h") == 32
    assert ledger.table("g1") == host[8:10]
    ledger.check()


def test_check_detects_corruption() -> None:
    ledger = KVLedger(8, 4)
    ledger.allocate("a", 2)
    ledger.check()
    ledger._free.append(ledger.table("a")[0])  # a block both free and owned
    with pytest.raises(LedgerError):
        ledger.check()
    ledger = KVLedger(8, 4)
    ledger.allocate("a", 2)
    ledger._written["a"] = 9  # past the writable limit
    with pytest.raises(LedgerError):
        ledger.check()
    ledger = KVLedger(8, 4)
    ledger.allocate("a", 2)
    ledger._free.pop()  # a lost block
    with pytest.raises(LedgerError):
        ledger.check()
