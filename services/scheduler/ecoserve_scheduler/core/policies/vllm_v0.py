"""vLLM v0 (<= 0.5): prefill-first, no chunking, on-demand blocks, recompute preemption.

This is the scheduler the EcoServe paper compares against, and what "vLLM" meant in most 2023-24
serving papers: vLLM 0.4.x-0.5.x `vllm/core/scheduler.py`, `Scheduler._schedule_default` (chunked
prefill off, its default then), with `block_manager_v1` and the FCFS policy of `core/policy.py`.
Mirrored here:

* Prefill first. `_schedule_prefills` runs before anything else; if it schedules a prompt, the
  iteration holds prompts only and every decode waits (`Policy.prefill_first`, core/admit.py).
  Otherwise `_schedule_running` decodes every running request, and that iteration admits none.
* No chunking. A waiting request is admitted only if its whole prompt (prompt + outputs, for a
  recomputed one) fits what is left of `max_num_batched_tokens` (v0's default without chunked
  prefill: max(max_model_len, 2048), i.e. 4096 for Llama-2), a sequence slot is free
  (`max_num_seqs`, 256 by default, counts every running request, not just this iteration's),
  and its blocks fit leaving the 1% watermark free (`can_allocate`). The first request that does
  not fit stops admission: FCFS, nobody overtakes it.
* Decode blocks on demand (`can_append_slots`: one free block, no watermark).
* Recompute preemption (the default for a single-sequence request): when a decode cannot get a
  block, the running request of lowest FCFS priority is preempted (`running_queue.pop()` on the
  running queue sorted by arrival), the growing request itself if no one arrived later. Its
  blocks are freed, it goes back to the front of the waiting queue with its outputs kept, and is
  prefilled whole again. Without recomputed requests, latest arrival = most recently admitted.

Simplified or left out: swap preemption (v0 swaps only multi-sequence groups: beam search,
n > 1), `delay_factor` (default 0), prefix caching (off by default in v0), LoRA, CUDA-graph
batch padding, and the `prompt_limit` "ignored" path: vLLM refuses `max_num_batched_tokens <
max_model_len` without chunked prefill (`SchedulerConfig._verify_args`), so here the budget is
raised to at least the worker's max_model_len and every prompt fits it. vLLM allocates blocks
for the prompt at admission; the core also covers the first sampled token (at most one block
more, when the prompt fills its last block exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..request import Request
from ..step import Step
from .base import OnDemand, Policy

V0_MIN_BATCHED_TOKENS = 2048  # SchedulerConfig: max(max_model_len, 2048) without chunked prefill


@dataclass(frozen=True)
class PrefillFirstBudget:
    """`max_num_batched_tokens` for the prompts of a prefill iteration, nothing once the step
    holds a decode or is built; a prompt joins whole or not at all."""

    max_num_batched_tokens: int | None = None  # None: v0's default, max(max_model_len, 2048)
    chunked: bool = False

    def tokens(self, step: Step) -> int:
        budget = self.max_num_batched_tokens or V0_MIN_BATCHED_TOKENS
        return max(budget, step.spec.max_model_len)

    def prefill_budget(self, step: Step) -> int:
        if step.decode_ids or step.prefills:
            return 0  # a decode iteration admits nothing; a prefill iteration is already built
        return self.tokens(step)

    def admits(self, step: Step, r: Request) -> bool:
        return r.pending <= step.budget and len(step.running) < step.spec.max_num_seqs


class LatestArrival:
    """v0's victim: the running request that arrived last (latest admitted among equals)."""

    def victim(self, step: Step, r: Request) -> Request | None:
        victim: Request | None = None
        for o in step.running.values():  # admission order
            if victim is None or o.arrival_s >= victim.arrival_s:
                victim = o
        return victim


def vllm_v0_policy(max_num_batched_tokens: int | None = None) -> Policy:
    return Policy(
        "vllm-v0",
        admission=OnDemand(headroom_share=0.01),  # v0's default watermark
        budget=PrefillFirstBudget(max_num_batched_tokens),
        victims=LatestArrival(),
        prefill_first=True,
    )


__all__ = ["LatestArrival", "PrefillFirstBudget", "vllm_v0_policy"]
