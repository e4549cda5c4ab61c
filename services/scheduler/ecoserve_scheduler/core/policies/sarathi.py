"""Sarathi-Serve: stall-free chunked prefill.

Every running decode is scheduled before any prefill chunk, so ongoing generations never stall
behind a prompt; prefill chunks fill what is left of the token budget (the core's order). As in
Sarathi's vLLM (v0-era) implementation, a new request is admitted only when blocks for its whole
prompt are free; decode blocks are allocated on demand and the most recently admitted request is
preempted (recompute) when they run out.
"""

from __future__ import annotations

from ..request import Request
from .base import OnDemand, Policy


class WholePrompt(OnDemand):
    def admission_tokens(self, r: Request, n: int) -> int:
        return r.num_tokens  # the whole prompt (plus outputs being recomputed)


def sarathi_policy() -> Policy:
    return Policy("sarathi", admission=WholePrompt(headroom_share=0.01))
