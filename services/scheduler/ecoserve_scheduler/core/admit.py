"""Admissions: waiting requests join the step being built, in queue order, while they fit.

`reserve` admits one: its reservation from free blocks, else on a loan (KVCPipe), else, if the
policy overcommits, on demand with blocks taken from running reservations' unwritten tails.

Step 4 of `SchedulerCore.schedule` (core/scheduler.py), kept here so that a policy may also run
it first: a prefill-first policy (vLLM v0, `Policy.prefill_first`) admits before any decode is
scheduled, and a step that admits a prompt runs prompts alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .request import Request, Status
from .step import Step

if TYPE_CHECKING:
    from .scheduler import SchedulerCore


def admit(core: SchedulerCore, step: Step, budget: int | None = None) -> bool:
    """Admit the queue head into `step` (its token budget set to `budget` first, if given)
    until the budget, the sequence slots, the placement, the policy or the KV cache says no;
    returns whether the step holds a prompt chunk now. As vLLM v1: no admission in a step that
    preempted (a victim must not come straight back into the step it was removed from)."""
    if budget is not None:
        step.budget = budget
    policy, now = core.policy, step.now
    passed: list[Request] = []  # preempted requests that let the ones behind them try
    while not step.full and not step.preempted and not step.w.draining:
        head = policy.queue.peek(now)
        if head is None:
            break
        n = step.chunk(head, policy.chunked)
        if n == 0 or not core.placement.admits(step, head):
            break  # a less loaded worker takes it at its next step
        if not policy.budget.admits(step, head):
            break  # the policy's budget refuses it (e.g. the SLO guard, a whole-prompt rule)
        step.context_tokens += head.prompt_len
        if reserve(core, step, head, n):
            continue
        if not (head.num_output and policy.admission.passes_victims):
            break  # head of line waits: later requests must not overtake it
        # A victim waiting for a whole reservation lets first tokens that could overcommit go
        # past it (live, one held a burst back 2 s until it went late: TTFT 15 s). Off for
        # EcoServe by default: the simulator's TTFT/TPOT cells gained 6-12% with it, but live
        # (SmolLM2, bench-peer, side by side with vLLM's policy) it lost at every rate tried:
        # the back-pressure a waiting victim gives keeps the preemptions down.
        step.context_tokens -= head.prompt_len
        policy.queue.pop(head)
        passed.append(head)
    for r in passed:
        policy.queue.requeue(r, now, core.iter_time_ema_s)
    return bool(step.prefills)


def reserve(core: SchedulerCore, step: Step, r: Request, n: int) -> bool:
    """Admit r into this worker if its admission reservation fits; False to stop admitting.

    The reservation is capped at what one sequence may hold; a request whose next token
    cannot fit on any worker fails, one that fits only another worker waits for it."""
    policy, ledger = core.policy, step.ledger
    need = max(r.num_computed + n, r.num_tokens + 1 if n == r.pending else 0)
    cap = policy.capacity_tokens(ledger)
    if need > cap:
        if any(need <= policy.capacity_tokens(o.ledger) for o in core.workers.values()):
            return False
        policy.queue.pop(r)
        core.unwait(r)
        step.events.append(
            core._fail(r, step.now, "failed: needs more KV cache than any worker has")
        )
        return True
    blocks = ledger.blocks_for(min(max(policy.admission.admission_tokens(r, n), need), cap))
    headroom = int(policy.admission.headroom_share * ledger.num_blocks)
    if ledger.can_allocate(blocks + headroom):
        ledger.allocate(r.request_id, blocks)
    elif policy.lending.lend(step, r, blocks):
        core.counters.loans += 1
    elif policy.admission.overcommits(step, r) and take_tails(
        step, (now_blocks := ledger.blocks_for(need)) + headroom
    ):
        ledger.allocate(r.request_id, now_blocks)
        r.on_demand = True
        core.counters.overcommits += 1
    else:
        return False
    policy.queue.pop(r)
    r.status, r.worker_id = Status.RUNNING, step.spec.worker_id
    r.output_cap = min(r.sampling.max_tokens, step.spec.max_model_len - r.prompt_len)
    if r.admitted_s is None:
        r.admitted_s = step.now
    step.running[r.request_id] = r
    core.unwait(r)
    core.counters.admitted += 1
    step.run(r, n)
    return True


def take_tails(step: Step, blocks: int) -> bool:
    """Free `blocks` for an overcommitting admission from the unwritten tails of running
    reservations, longest tail first, each kept one block past what it has written (it grows
    on demand from then on, and preempts a victim if the bet loses)."""
    ledger = step.ledger
    # Below zero when extensions have dipped into the reserve pool: that comes back first.
    short = blocks - (ledger.num_free_total - ledger.reserve_blocks)
    if short <= 0:
        return True
    tails = sorted(
        [
            (len(ledger.table(rid)) - ledger.blocks_for(ledger.written(rid) + 1), rid)
            for rid in step.running
            if not ledger.is_guest(rid) and not ledger.guests_of(rid)  # loans stay as they are
        ],
        reverse=True,
    )
    if sum(t for t, _ in tails if t > 0) < short:
        return False
    for tail, rid in tails:
        if short <= 0 or tail <= 0:
            break
        keep = len(ledger.table(rid)) - min(tail, short)
        short -= ledger.trim(rid, keep)
        step.running[rid].on_demand = True
    return ledger.can_allocate(blocks)


__all__ = ["admit", "reserve", "take_tails"]
