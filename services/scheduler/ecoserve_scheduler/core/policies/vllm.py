"""vLLM v1: FCFS, KV blocks allocated on demand as tokens are written, chunked prefill within a
token budget, and recompute preemption of the most recently admitted request when a block
allocation fails.

Source of truth: vLLM's V1 engine scheduler (the default since vLLM 0.8), `vllm/v1/core/sched/
scheduler.py` `Scheduler.schedule()` with its `KVCacheManager`. Running requests are visited in
admission order, each taking its decode token or prefill chunk from the budget (so a long chunk
can push later ones to the next step); new requests join FCFS while budget, `max_num_seqs` and
blocks last, keeping a 1% watermark of free blocks (early V1's KVCacheManager `watermark=0.01`,
as v0's block manager); when `allocate_slots` fails, the last request of the running list is
preempted (recompute: its blocks freed, `num_computed_tokens` reset) and goes back to the front
of the waiting queue.

Simplified: decodes are scheduled before running prefills (the core's order; it differs from
admission order only for a recomputing request, see core/scheduler.py); no prefix caching (on
by default in V1, so a recomputed request re-prefills what the cache would have kept), no
speculative decoding, no `long_prefill_token_threshold`; the token budget is the worker's (the
profile's knee in the simulator), not vLLM's `max_num_batched_tokens` default, which varies by
version, GPU and entry point. For vLLM <= 0.5 (the paper's baseline: prefill-first, no
chunking) see vllm_v0.py.
"""

from __future__ import annotations

from .base import OnDemand, Policy


def vllm_policy() -> Policy:
    return Policy("vllm", admission=OnDemand(headroom_share=0.01))  # vLLM's default watermark
