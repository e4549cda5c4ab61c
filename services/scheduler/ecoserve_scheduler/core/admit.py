"""Admissions: waiting requests join the step being built, in queue order, while they fit.

Step 4 of `SchedulerCore.schedule` (core/scheduler.py), kept here so that a policy may also run
it first: a prefill-first policy (vLLM v0, `Policy.prefill_first`) admits before any decode is
scheduled, and a step that admits a prompt runs prompts alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    while not step.full and not step.preempted:
        head = policy.queue.peek(now)
        if head is None:
            break
        n = step.chunk(head, policy.chunked)
        if n == 0 or not core.placement.admits(step, head):
            break  # a less loaded worker takes it at its next step
        if not policy.budget.admits(step, head):
            break  # the policy's budget refuses it (e.g. the SLO guard, a whole-prompt rule)
        step.context_tokens += head.prompt_len
        if not core._reserve(step, head, n):
            break  # head of line waits: later requests must not overtake it
    return bool(step.prefills)


__all__ = ["admit"]
