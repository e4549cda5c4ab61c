"""vLLM v1: FCFS, KV blocks allocated on demand as tokens are written, chunked prefill within a
token budget, and recompute preemption of the most recently admitted request when a block
allocation fails.

Matches vLLM v1's `Scheduler.schedule()`: running requests are visited in admission order, each
taking its decode token or prefill chunk from the budget (so a long chunk can push later ones to
the next step); new requests join FCFS while budget, `max_num_seqs` and blocks last, keeping a
1% watermark of free blocks; the preempted request goes back to the front of the queue.
"""

from __future__ import annotations

from .base import OnDemand, Policy


def vllm_policy() -> Policy:
    return Policy("vllm", admission=OnDemand(headroom_share=0.01))  # vLLM's default watermark
