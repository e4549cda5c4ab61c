"""Orca: iteration-level scheduling with KV reserved for the maximum length up front.

Each admitted request reserves prompt + max_tokens at once, so an allocation never fails
mid-generation and nothing is ever preempted, at the price of holding space that is mostly never
written. Prompts are not chunked: a prompt runs whole in one iteration (alone, if it is larger
than the token budget). FCFS.
"""

from __future__ import annotations

from ..request import Request
from .base import FullBudget, OnDemand, Policy


class MaxLength(OnDemand):
    def admission_tokens(self, r: Request, n: int) -> int:
        return r.prompt_len + r.sampling.max_tokens


def orca_policy() -> Policy:
    return Policy("orca", admission=MaxLength(), budget=FullBudget(chunked=False))
