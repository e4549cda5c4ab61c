"""KV-cache ledger of one worker: which physical block belongs to which sequence.

Blocks are tracked by id. Every sequence has a block table (list of block ids, in token order).
A sequence either *owns* its blocks or is a *guest* on a loan: a contiguous run of blocks in the
unused tail of a *host*'s reservation (KVCPipe). The host keeps those blocks in its own table, so
a loan costs no extra memory; the ledger only forbids the host to write past the start of a loan.

Invariants (checked by `check()` and the property tests):
  * conservation: free blocks + blocks in owners' tables == num_blocks, no id twice;
  * a guest's blocks are exactly host_table[start:start + n] of a live host;
  * no sequence has written past its writable limit, so a physical slot holds at most one live
    sequence's token and a host never writes into a slot lent to a live guest.

The reserve pool is a count of free blocks that only `extend` and `move_guest` may take
(under-prediction and collision escapes), never a fresh admission.
"""

from __future__ import annotations

from dataclasses import dataclass


class LedgerError(RuntimeError):
    """A caller broke the ledger's contract (a bug, never a normal outcome)."""


@dataclass
class Loan:
    host_id: str
    start: int  # index into the host's table
    n_blocks: int


@dataclass(frozen=True)
class Usage:
    num_blocks: int
    blocks_used: int  # reserved by some sequence (owned)
    blocks_lent: int  # of blocks_used, currently lent to guests
    tokens_written: int  # tokens actually held in the cache
    reserve_blocks: int

    @property
    def reserved_share(self) -> float:
        return self.blocks_used / self.num_blocks if self.num_blocks else 0.0

    def as_stats(self) -> dict[str, float]:
        """What `SchedulerCore.stats` reports per worker."""
        return {
            "num_blocks": self.num_blocks,
            "blocks_used": self.blocks_used,
            "blocks_lent": self.blocks_lent,
            "tokens_written": self.tokens_written,
            "reserved_share": round(self.reserved_share, 4),
        }


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class KVLedger:
    def __init__(self, num_blocks: int, block_size: int, reserve_blocks: int = 0) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be > 0")
        if not 0 <= reserve_blocks < num_blocks:
            raise ValueError("reserve_blocks must be in [0, num_blocks)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.reserve_blocks = reserve_blocks
        # LIFO: recently freed blocks are reused first (warm in a real cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._written: dict[str, int] = {}
        self._loans: dict[str, Loan] = {}  # guest id -> loan
        self._guests: dict[str, list[str]] = {}  # host id -> guest ids, lowest start first
        self._tokens_written = 0
        # seq id -> writable token count; kept current by every operation so that the per-step
        # hot path is one dict lookup (see `writable`).
        self.limit: dict[str, int] = {}

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Free blocks a fresh admission may take (the reserve pool excluded)."""
        return max(0, len(self._free) - self.reserve_blocks)

    @property
    def num_free_total(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def can_allocate(self, n_blocks: int, use_reserve: bool = False) -> bool:
        return n_blocks <= (len(self._free) if use_reserve else self.num_free)

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def table(self, seq_id: str) -> list[int]:
        """The live block table (do not mutate)."""
        return self._tables[seq_id]

    def written(self, seq_id: str) -> int:
        return self._written[seq_id]

    def is_guest(self, seq_id: str) -> bool:
        return seq_id in self._loans

    def host_of(self, seq_id: str) -> str | None:
        loan = self._loans.get(seq_id)
        return loan.host_id if loan else None

    def guests_of(self, host_id: str) -> list[str]:
        return self._guests.get(host_id, [])

    def hosts(self) -> list[str]:
        """Sequences that currently lend part of their table."""
        return [h for h, guests in self._guests.items() if guests]

    def loan(self, guest_id: str) -> Loan | None:
        return self._loans.get(guest_id)

    def writable(self, seq_id: str) -> int:
        """Tokens this sequence may hold: its table, cut at the first block lent away."""
        return self.limit[seq_id]

    def _relimit(self, seq_id: str) -> None:
        guests = self._guests.get(seq_id)
        if guests:
            self.limit[seq_id] = self._loans[guests[0]].start * self.block_size
        else:
            self.limit[seq_id] = len(self._tables[seq_id]) * self.block_size

    def usage(self) -> Usage:
        lent = sum(loan.n_blocks for loan in self._loans.values())
        return Usage(
            num_blocks=self.num_blocks,
            blocks_used=self.num_blocks - len(self._free),
            blocks_lent=lent,
            tokens_written=self._tokens_written,
            reserve_blocks=self.reserve_blocks,
        )

    # ---- owners ----------------------------------------------------------------------------

    def allocate(self, seq_id: str, n_blocks: int, use_reserve: bool = False) -> list[int]:
        if seq_id in self._tables:
            raise LedgerError(f"{seq_id} already holds blocks")
        if not self.can_allocate(n_blocks, use_reserve):
            raise LedgerError(f"cannot allocate {n_blocks} blocks for {seq_id}")
        table = [self._free.pop() for _ in range(n_blocks)]
        self._tables[seq_id] = table
        self._written[seq_id] = 0
        self._relimit(seq_id)
        return table

    def extend(self, seq_id: str, n_blocks: int, use_reserve: bool = False) -> bool:
        """Append blocks to an owner's table; False (and no change) if they are not there."""
        if seq_id in self._loans:
            raise LedgerError(f"{seq_id} is a guest: move it instead of extending in place")
        if self._guests.get(seq_id):
            raise LedgerError(f"{seq_id} has guests inside its table: move them first")
        if not self.can_allocate(n_blocks, use_reserve):
            return False
        table = self._tables[seq_id]
        table.extend(self._free.pop() for _ in range(n_blocks))
        self._relimit(seq_id)
        return True

    def trim(self, seq_id: str, n_blocks: int) -> int:
        """Shorten an owner's table to `n_blocks` (never below what it has written), freeing the
        unwritten tail; returns the blocks freed. An owner with guests keeps its table."""
        if seq_id in self._loans or self._guests.get(seq_id):
            return 0
        table = self._tables[seq_id]
        keep = max(n_blocks, self.blocks_for(self._written[seq_id]))
        if keep >= len(table):
            return 0
        tail = table[keep:]
        del table[keep:]
        self._free.extend(reversed(tail))
        self._relimit(seq_id)
        return len(tail)

    def advance(self, seq_id: str, tokens: int) -> None:
        """Record that the sequence now holds `tokens` tokens (positions [0, tokens))."""
        if tokens > self.writable(seq_id):
            raise LedgerError(f"{seq_id} would write {tokens} tokens past {self.writable(seq_id)}")
        self._tokens_written += tokens - self._written[seq_id]
        self._written[seq_id] = tokens

    def advance_decodes(self, seq_ids: list[str]) -> None:
        """One more token for each sequence; the caller checked each against `limit`."""
        written = self._written
        for seq_id in seq_ids:
            written[seq_id] += 1
        self._tokens_written += len(seq_ids)

    def free(self, seq_id: str) -> None:
        """Release a sequence. A host's loans pass to their guests, which become owners."""
        table = self._tables.pop(seq_id)
        self._tokens_written -= self._written.pop(seq_id)
        del self.limit[seq_id]
        loan = self._loans.pop(seq_id, None)
        if loan is not None:  # a guest: its blocks stay in the host's reservation
            self._guests[loan.host_id].remove(seq_id)
            self._relimit(loan.host_id)
            return
        lent: set[int] = set()
        for guest in self._guests.pop(seq_id, []):
            lent.update(self._tables[guest])
            del self._loans[guest]
        self._free.extend(b for b in reversed(table) if b not in lent)

    # ---- KVCPipe loans ---------------------------------------------------------------------

    def lendable(self, host_id: str, min_start: int) -> int:
        """Blocks the host could lend at table index >= min_start (below any existing loan)."""
        if host_id in self._loans:
            return 0  # guests do not sub-lend: keeps every loan one hop from an owner
        table = self._tables[host_id]
        top = (
            self._loans[self._guests[host_id][0]].start if self._guests.get(host_id) else len(table)
        )
        floor = max(min_start, self.blocks_for(self._written[host_id]))
        return max(0, top - floor)

    def lend(self, host_id: str, guest_id: str, n_blocks: int, min_start: int) -> list[int]:
        """Lend the n highest unlent blocks of the host's tail to a new guest sequence."""
        if guest_id in self._tables:
            raise LedgerError(f"{guest_id} already holds blocks")
        if n_blocks <= 0 or self.lendable(host_id, min_start) < n_blocks:
            raise LedgerError(f"{host_id} cannot lend {n_blocks} blocks above {min_start}")
        guests = self._guests.setdefault(host_id, [])
        top = self._loans[guests[0]].start if guests else len(self._tables[host_id])
        start = top - n_blocks
        self._loans[guest_id] = Loan(host_id, start, n_blocks)
        guests.insert(0, guest_id)
        table = self._tables[host_id][start:top]
        self._tables[guest_id] = table
        self._written[guest_id] = 0
        self.limit[guest_id] = n_blocks * self.block_size
        self._relimit(host_id)
        return table

    def move_guest(
        self, guest_id: str, n_blocks: int, use_reserve: bool = True
    ) -> list[tuple[int, int]] | None:
        """Move a guest onto fresh blocks it owns. Returns the (src, dst) block copies for the
        blocks holding its tokens, or None (and no change) if the blocks are not there."""
        loan = self._loans.get(guest_id)
        if loan is None:
            raise LedgerError(f"{guest_id} is not a guest")
        old = self._tables[guest_id]
        n_blocks = max(n_blocks, self.blocks_for(self._written[guest_id]))
        if not self.can_allocate(n_blocks, use_reserve):
            return None
        new = [self._free.pop() for _ in range(n_blocks)]
        used = self.blocks_for(self._written[guest_id])
        copies = list(zip(old[:used], new[:used], strict=True))
        self._guests[loan.host_id].remove(guest_id)
        del self._loans[guest_id]
        self._tables[guest_id] = new
        self._relimit(guest_id)
        self._relimit(loan.host_id)
        return copies

    # ---- checking --------------------------------------------------------------------------

    def check(self) -> None:
        """Raise LedgerError if any invariant is broken (tests and debug runs)."""
        seen: set[int] = set(self._free)
        if len(seen) != len(self._free):
            raise LedgerError("a block is free twice")
        for seq_id, table in self._tables.items():
            if seq_id in self._loans:
                continue
            for b in table:
                if b in seen:
                    raise LedgerError(f"block {b} of {seq_id} is also free or owned twice")
                seen.add(b)
        if len(seen) != self.num_blocks:
            raise LedgerError(f"{self.num_blocks - len(seen)} blocks lost")
        for guest, loan in self._loans.items():
            host = self._tables.get(loan.host_id)
            if host is None or loan.host_id in self._loans:
                raise LedgerError(f"guest {guest} has no live owning host")
            if host[loan.start : loan.start + loan.n_blocks] != self._tables[guest]:
                raise LedgerError(f"guest {guest}'s table is not its host's lent run")
        for seq_id in self._tables:
            guests = self._guests.get(seq_id)
            want = (
                self._loans[guests[0]].start if guests else len(self._tables[seq_id])
            ) * self.block_size
            if self.limit.get(seq_id) != want:
                raise LedgerError(f"{seq_id}'s cached writable limit is stale")
        for seq_id, n in self._written.items():
            if n > self.writable(seq_id):
                raise LedgerError(f"{seq_id} holds {n} tokens past its writable limit")
        if sum(self._written.values()) != self._tokens_written:
            raise LedgerError("tokens_written counter drifted")
