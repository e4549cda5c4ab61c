"""The iteration skeleton every policy shares, and the hooks where policies differ.

One iteration (vLLM v1 shape):
  1. `before(step)`             policy housekeeping (EcoServe: move guests away from hosts);
  2. running requests: every decode gets one token, then prefills (in `prefill_order`) get
     chunks; each after `make_room` made its block table long enough (grow, else preempt a
     `victim`);
  3. waiting requests, in queue order, while budget, sequence slots and KV `reserve` allow.

A policy is a small subclass: a queue, what to reserve at admission, how to grow, whom to evict.
"""

from __future__ import annotations

from ..core import Step
from ..queues import FifoQueue
from ..request import Request, Status


class Policy:
    name = "base"
    chunked = True  # chunked prefill within the token budget
    headroom_share = 0.0  # admissions leave this share of blocks free (vLLM's watermark)
    use_reserve = False  # extensions may take the reserve pool
    reserve_share = 0.0  # share of blocks held back as that reserve pool
    wants_oracle_rl = False

    def __init__(self) -> None:
        self.queue = self.make_queue()

    # ---- queue ----------------------------------------------------------------------------

    def make_queue(self):
        return FifoQueue()

    def push(self, r: Request, now: float, core) -> None:
        self.queue.push(r, now)

    def requeue(self, r: Request, now: float, core) -> None:
        self.queue.requeue(r, now)

    def on_done(self, r: Request, now: float) -> None:
        """r finished, failed or was aborted: drop any per-request state."""

    # ---- hooks ----------------------------------------------------------------------------

    def before(self, step: Step) -> None:
        pass

    def after_decodes(self, step: Step) -> None:
        """Called once every decode is scheduled, before prefill chunks and admissions."""

    def prefill_order(self, step: Step, prefills: list[Request]) -> list[Request]:
        """Order of running requests still prefilling (default: admission order)."""
        return prefills

    def admission_tokens(self, r: Request, n: int) -> int:
        """Tokens to reserve when r is admitted with a first chunk of n (default: on demand)."""
        return r.num_computed + n

    def growth_tokens(self, r: Request, need: int) -> int:
        """Tokens r's table should cover when it must hold `need` (default: exactly that)."""
        return need

    def victim(self, step: Step, r: Request) -> Request | None:
        """Whom to preempt so r can grow. Default, vLLM's: the most recently admitted running
        request, which may be r itself (then r is the one that waits)."""
        return next(reversed(step.running.values()), None)

    def capacity_tokens(self, ledger) -> int:
        """Most tokens one sequence may ever hold on this ledger under this policy."""
        headroom = int(self.headroom_share * ledger.num_blocks)
        return (ledger.num_blocks - ledger.reserve_blocks - headroom) * ledger.block_size

    def lend(self, step: Step, r: Request, blocks: int) -> bool:
        """Admit r into borrowed blocks when fresh ones are short (only EcoServe lends)."""
        return False

    # ---- skeleton -------------------------------------------------------------------------

    def schedule(self, step: Step) -> None:
        """Decodes first (each takes one token), then running prefills, then admissions.

        vLLM v1 visits running requests in admission order instead; the two differ only when an
        earlier-admitted request is still prefilling, which after admission-order prefill is
        only a recomputing request, so every policy shares this order (Sarathi's stall-free
        batching)."""
        self.before(step)
        w = step.w
        for r in step.run_decodes(list(w.decoding.values())):
            live = r.status is Status.RUNNING and not step.full
            if live and self.make_room(step, r, r.num_computed + 1):
                step.run(r, 1)
        self.after_decodes(step)
        prefills = [r for r in w.running.values() if r.request_id not in w.decoding]
        for r in self.prefill_order(step, prefills):
            if r.status is not Status.RUNNING or step.full:
                continue  # preempted as a victim earlier in this loop
            n = step.chunk(r, self.chunked)
            if n and (
                r.num_computed + n <= step.ledger.limit[r.request_id]
                or self.make_room(step, r, r.num_computed + n)
            ):
                step.run(r, n)
        self.admit_waiting(step)

    def make_room(self, step: Step, r: Request, tokens: int) -> bool:
        """Make r's writable region hold `tokens`; False if r had to be preempted or failed."""
        ledger, rid = step.ledger, r.request_id
        while ledger.writable(rid) < tokens:
            guests = ledger.guests_of(rid)
            if guests:
                self.evict_guest(step, step.core.requests[guests[0]])
                continue
            if self.grow(step, r, tokens):
                continue
            if tokens > self.capacity_tokens(ledger):
                step.fail_running(r, "failed: sequence outgrew the KV cache")
                return False
            victim = self.victim(step, r)
            if victim is None or victim is r:
                step.preempt(r, "out of KV cache")
                return False
            step.preempt(victim, f"KV cache needed by {rid}")
        return True

    def grow(self, step: Step, r: Request, tokens: int) -> bool:
        """Lengthen r's table: to the policy's growth target, else to the exact need; from
        free blocks first, then (if the policy may) the reserve pool. A guest moves instead."""
        ledger, rid = step.ledger, r.request_id
        targets = dict.fromkeys(
            (ledger.blocks_for(self.growth_tokens(r, tokens)), ledger.blocks_for(tokens))
        )
        for use_reserve in (False, True) if self.use_reserve else (False,):
            for want in targets:
                if ledger.is_guest(rid):
                    copies = ledger.move_guest(rid, want, use_reserve=use_reserve)
                    if copies is not None:
                        step.copies.extend(copies)
                        step.core.counters.guest_moves += 1
                        return True
                elif ledger.extend(rid, want - len(ledger.table(rid)), use_reserve=use_reserve):
                    step.core.counters.extensions += 1
                    r.extensions += 1
                    return True
        return False

    def evict_guest(self, step: Step, guest: Request) -> None:
        """Move a guest off its host's blocks (fresh blocks, then reserve), else preempt it."""
        ledger = step.ledger
        want = ledger.blocks_for(self.admission_tokens(guest, 0))
        copies = ledger.move_guest(guest.request_id, want, use_reserve=True)
        if copies is None:
            step.core.counters.guest_preemptions += 1
            step.preempt(guest, "KVCPipe collision: no free blocks to move to")
        else:
            step.copies.extend(copies)
            step.core.counters.guest_moves += 1

    def peek_waiting(self, now: float) -> Request | None:
        return self.queue.peek(now)

    def pop_waiting(self, r: Request) -> None:
        """Remove r, the request `peek_waiting` returned, from the queue."""
        self.queue.pop(r)

    def admit_waiting(self, step: Step) -> None:
        # As vLLM v1: no admissions in a step that preempted (a victim must not come straight
        # back into the step it was removed from).
        while not step.full and not step.preempted:
            r = self.peek_waiting(step.now)
            if r is None:
                return
            n = step.chunk(r, self.chunked)
            if n == 0:
                return
            if not step.core.placement.admits(step, r):
                return  # a less loaded worker takes it at its next step
            if not self.reserve(step, r, n):
                return  # head of line waits: later requests must not overtake it

    def reserve(self, step: Step, r: Request, n: int) -> bool:
        """Admit r into this worker if its admission reservation fits; False to stop admitting.

        The reservation is capped at what one sequence may hold; a request whose next token
        cannot fit on any worker fails, one that fits only another worker waits for it."""
        ledger = step.ledger
        need = max(r.num_computed + n, r.num_tokens + 1 if n == r.pending else 0)
        cap = self.capacity_tokens(ledger)
        if need > cap:
            if any(need <= self.capacity_tokens(w.ledger) for w in step.core.workers.values()):
                return False
            self.pop_waiting(r)
            step.fail_waiting(r, "failed: needs more KV cache than any worker has")
            return True
        blocks = ledger.blocks_for(min(max(self.admission_tokens(r, n), need), cap))
        headroom = int(self.headroom_share * ledger.num_blocks)
        if ledger.can_allocate(blocks + headroom):
            ledger.allocate(r.request_id, blocks)
        elif not self.lend(step, r, blocks):
            return False
        self.pop_waiting(r)
        step.admit(r)
        step.run(r, n)
        return True
