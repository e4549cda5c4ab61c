"""Property test of KVLedger: a state machine with a shadow of the physical cache.

Every (block, offset) slot records which live sequence holds a token there. After every
operation the ledger's own `check()` must pass, no slot may hold two live sequences' tokens, and
no host may hold a token in a block lent to a live guest.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ecoserve_scheduler.core.ledger import KVLedger, LedgerError

# ---- (a) KVLedger state machine -------------------------------------------------------------


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger: KVLedger | None = None
        self.ids = 0
        self.tokens: dict[str, list[tuple[int, int]]] = {}  # seq -> slot of each position
        self.holder: dict[tuple[int, int], str] = {}  # slot -> live sequence holding a token

    @initialize(
        num_blocks=st.integers(1, 24), block_size=st.integers(1, 4), reserve=st.integers(0, 4)
    )
    def init(self, num_blocks: int, block_size: int, reserve: int) -> None:
        self.ledger = KVLedger(num_blocks, block_size, min(reserve, num_blocks - 1))

    # ---- helpers ---------------------------------------------------------------------------

    def new_id(self) -> str:
        self.ids += 1
        return f"s{self.ids}"

    def live(self) -> list[str]:
        return sorted(self.tokens)

    def owners(self) -> list[str]:
        return [s for s in self.live() if not self.ledger.is_guest(s)]

    def guests(self) -> list[str]:
        return [s for s in self.live() if self.ledger.is_guest(s)]

    def owned_blocks(self) -> int:
        return sum(len(self.ledger.table(s)) for s in self.owners())

    def free_total(self) -> int:
        return self.ledger.num_blocks - self.owned_blocks()

    def fits(self, n: int, use_reserve: bool) -> bool:
        free = self.free_total()
        return n <= (free if use_reserve else max(0, free - self.ledger.reserve_blocks))

    def write(self, seq: str, upto: int) -> None:
        """Shadow of a sequence now holding positions [0, upto)."""
        ledger, toks = self.ledger, self.tokens[seq]
        bs, table = ledger.block_size, ledger.table(seq)
        while len(toks) > upto:
            del self.holder[toks.pop()]
        while len(toks) < upto:
            pos = len(toks)
            slot = (table[pos // bs], pos % bs)
            other = self.holder.get(slot)
            assert other is None, f"{seq} writes slot {slot} holding a token of {other}"
            self.holder[slot] = seq
            toks.append(slot)

    def release(self, seq: str) -> None:
        for slot in self.tokens.pop(seq):
            del self.holder[slot]

    # ---- rules -----------------------------------------------------------------------------

    @rule(n=st.integers(0, 8), use_reserve=st.booleans())
    def allocate(self, n: int, use_reserve: bool) -> None:
        seq = self.new_id()
        if self.fits(n, use_reserve):
            table = self.ledger.allocate(seq, n, use_reserve)
            assert len(table) == n and self.ledger.written(seq) == 0
            self.tokens[seq] = []
        else:
            free_before = self.ledger.num_free_total
            try:
                self.ledger.allocate(seq, n, use_reserve)
            except LedgerError:
                pass
            else:
                raise AssertionError("allocate past the free blocks succeeded")
            assert not self.ledger.has(seq) and self.ledger.num_free_total == free_before

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(0, 6), use_reserve=st.booleans())
    def extend(self, data, n: int, use_reserve: bool) -> None:
        seq = data.draw(st.sampled_from(self.live()))
        ledger = self.ledger
        before = list(ledger.table(seq))
        if ledger.is_guest(seq) or ledger.guests_of(seq):
            try:
                ledger.extend(seq, n, use_reserve)
            except LedgerError:
                assert ledger.table(seq) == before
                return
            raise AssertionError("a guest or a host extended in place")
        fits = self.fits(n, use_reserve)
        ok = ledger.extend(seq, n, use_reserve)
        assert ok == fits
        table = ledger.table(seq)
        assert table[: len(before)] == before
        assert len(table) == len(before) + (n if ok else 0)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def advance(self, data) -> None:
        seq = data.draw(st.sampled_from(self.live()))
        ledger = self.ledger
        limit = ledger.writable(seq)
        tokens = data.draw(st.integers(0, limit + 3))
        if tokens > limit:
            written = ledger.written(seq)
            try:
                ledger.advance(seq, tokens)
            except LedgerError:
                assert ledger.written(seq) == written
                return
            raise AssertionError(f"advance to {tokens} past writable {limit} succeeded")
        ledger.advance(seq, tokens)
        self.write(seq, tokens)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def advance_decodes(self, data) -> None:
        ledger = self.ledger
        room = [s for s in self.live() if ledger.written(s) < ledger.writable(s)]
        if not room:
            return
        seqs = data.draw(st.lists(st.sampled_from(room), unique=True, min_size=1))
        ledger.advance_decodes(seqs)
        for s in seqs:
            self.write(s, len(self.tokens[s]) + 1)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def lend(self, data) -> None:
        host = data.draw(st.sampled_from(self.live()))
        ledger = self.ledger
        table = list(ledger.table(host))
        min_start = data.draw(st.integers(0, len(table) + 1))
        if ledger.is_guest(host):
            expect = 0
        else:
            guests = ledger.guests_of(host)
            top = ledger.loan(guests[0]).start if guests else len(table)
            floor = max(min_start, ledger.blocks_for(ledger.written(host)))
            expect = max(0, top - floor)
        assert ledger.lendable(host, min_start) == expect
        # mostly a loan that fits, sometimes one that must be refused
        n = data.draw(
            st.integers(1, expect) if expect and data.draw(st.booleans()) else st.integers(0, 6)
        )
        guest = self.new_id()
        if n <= 0 or expect < n:
            try:
                ledger.lend(host, guest, n, min_start)
            except LedgerError:
                assert not ledger.has(guest)
                return
            raise AssertionError("an impossible loan succeeded")
        free_before = ledger.num_free_total
        guests = ledger.guests_of(host)
        top = ledger.loan(guests[0]).start if guests else len(table)
        got = ledger.lend(host, guest, n, min_start)
        assert got == table[top - n : top]  # the highest unlent run of the host's tail
        assert ledger.table(guest) == got and ledger.host_of(guest) == host
        assert ledger.writable(host) == (top - n) * ledger.block_size
        assert ledger.num_free_total == free_before  # a loan costs no memory
        self.tokens[guest] = []

    @precondition(lambda self: any(self.ledger.is_guest(s) for s in self.tokens))
    @rule(data=st.data())
    def advance_guest(self, data) -> None:
        guest = data.draw(st.sampled_from(self.guests()))
        tokens = data.draw(st.integers(0, self.ledger.writable(guest)))
        self.ledger.advance(guest, tokens)
        self.write(guest, tokens)

    @precondition(lambda self: any(self.ledger.is_guest(s) for s in self.tokens))
    @rule(data=st.data(), n=st.integers(0, 8), use_reserve=st.booleans())
    def move_guest(self, data, n: int, use_reserve: bool) -> None:
        guest = data.draw(st.sampled_from(self.guests()))
        ledger = self.ledger
        old = list(ledger.table(guest))
        host = ledger.host_of(guest)
        written = ledger.written(guest)
        used = ledger.blocks_for(written)
        want = max(n, used)
        fits = self.fits(want, use_reserve)
        copies = ledger.move_guest(guest, n, use_reserve)
        if not fits:
            assert copies is None
            assert ledger.is_guest(guest) and ledger.host_of(guest) == host
            assert ledger.table(guest) == old and ledger.written(guest) == written
            return
        assert copies is not None
        new = ledger.table(guest)
        assert not ledger.is_guest(guest) and len(new) == want
        assert copies == list(zip(old[:used], new[:used], strict=True))  # written blocks only
        assert ledger.written(guest) == written
        # the worker copies blocks: the guest's tokens now live in the new blocks
        bs = ledger.block_size
        for slot in self.tokens[guest]:
            del self.holder[slot]
        self.tokens[guest] = []
        self.write(guest, written)
        for pos, slot in enumerate(self.tokens[guest]):
            assert (old[pos // bs], pos % bs) in {(s, slot[1]) for s, d in copies if d == slot[0]}

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data) -> None:
        seq = data.draw(st.sampled_from(self.live()))
        ledger = self.ledger
        guests = list(ledger.guests_of(seq))
        guest_tables = {g: list(ledger.table(g)) for g in guests}
        host = ledger.host_of(seq)
        host_table = list(ledger.table(host)) if host else None
        owned_before = self.owned_blocks()
        n_table = len(ledger.table(seq))
        ledger.free(seq)
        self.release(seq)
        assert not ledger.has(seq)
        for g, table in guest_tables.items():  # the loans pass to the guests
            assert ledger.table(g) == table and not ledger.is_guest(g)
        if host is not None:  # a guest's blocks return to its host
            assert ledger.table(host) == host_table
            assert self.owned_blocks() == owned_before
        else:
            assert self.owned_blocks() == owned_before - n_table + sum(
                len(t) for t in guest_tables.values()
            )

    # ---- invariants ------------------------------------------------------------------------

    @invariant()
    def ledger_is_consistent(self) -> None:
        if self.ledger is None:
            return
        ledger = self.ledger
        ledger.check()
        bs = ledger.block_size
        owned: set[int] = set()
        for s in self.owners():
            owned.update(ledger.table(s))
        assert ledger.num_free_total == ledger.num_blocks - len(owned)
        assert ledger.num_free == max(0, ledger.num_free_total - ledger.reserve_blocks)
        total = 0
        for s, toks in self.tokens.items():
            assert ledger.has(s) and ledger.written(s) == len(toks)
            table = ledger.table(s)
            for pos, slot in enumerate(toks):
                assert slot == (table[pos // bs], pos % bs), f"{s} pos {pos} moved"
                assert slot[0] in owned, f"{s} holds a token in free block {slot[0]}"
            total += len(toks)
        u = ledger.usage()
        assert u.tokens_written == total
        assert u.blocks_used == len(owned)
        assert u.blocks_lent == sum(len(ledger.table(g)) for g in self.guests())
        for g in self.guests():  # a host never holds a token in a block lent to a live guest
            host = ledger.host_of(g)
            host_blocks = {b for b, _ in self.tokens[host]}
            assert not host_blocks & set(ledger.table(g)), f"{host} wrote into {g}'s loan"


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestLedgerMachine = LedgerMachine.TestCase
