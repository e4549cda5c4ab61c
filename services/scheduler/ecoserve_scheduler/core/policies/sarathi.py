"""Sarathi-Serve: stall-free chunked prefill.

Source of truth: Sarathi-Serve (Agrawal et al., "Taming Throughput-Latency Tradeoff in LLM
Inference with Sarathi-Serve", OSDI 2024) and its implementation's `SarathiScheduler`
(github.com/microsoft/sarathi-serve, built on vLLM v0's block manager). Every running decode is
scheduled before any prefill chunk, so ongoing generations never stall behind a prompt; prefill
chunks (running prompts first, then new ones, FCFS) fill what is left of the token budget (the
core's order). A new request is admitted only when blocks for its whole prompt are free (plus
vLLM v0's 1% watermark); decode blocks are allocated on demand, and when they run out the most
recently admitted request is preempted by recompute.

Simplified: the token budget ("chunk size") is the worker's, in the simulator the profile's
knee, where Sarathi-Serve picks it per deployment by profiling against a TBT SLO (512-2048 in
the paper); Sarathi's batch-size cap is the worker's `max_num_seqs`; no pipeline parallelism.
"""

from __future__ import annotations

from ..request import Request
from .base import OnDemand, Policy


class WholePrompt(OnDemand):
    def admission_tokens(self, r: Request, n: int) -> int:
        return r.num_tokens  # the whole prompt (plus outputs being recomputed)


def sarathi_policy() -> Policy:
    return Policy("sarathi", admission=WholePrompt(headroom_share=0.01))
