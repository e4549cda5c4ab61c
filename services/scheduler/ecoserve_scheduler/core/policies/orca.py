"""Orca: iteration-level scheduling with KV reserved for the maximum length up front.

Source of truth: Orca (Yu et al., "Orca: A Distributed Serving System for Transformer-Based
Generative Models", OSDI 2022), its Algorithm 1 (Orca itself is not public). Each admitted
request reserves prompt + max_tokens slots at once, so an allocation never fails mid-generation
and nothing is ever preempted, at the price of holding space that is mostly never written.
Prompts are not chunked: a prompt runs whole in one iteration, batched with the decodes
(selective batching). FCFS; the head that does not fit stops admission.

Simplified: the reservation is in paged blocks (Orca reserves contiguous slots; the amount is the
same); `max_tokens` is the request's own, which in the simulator is whatever the context leaves
(clients rarely know the answer's length), so Orca reserves up to max_model_len per request;
Orca's batch is bounded by max_bs alone, here by `max_num_seqs`, and admissions also stop once
the worker's token budget is spent (one prompt may overrun it).
"""

from __future__ import annotations

from ..request import Request
from .base import FullBudget, OnDemand, Policy


class MaxLength(OnDemand):
    def admission_tokens(self, r: Request, n: int) -> int:
        return r.prompt_len + r.sampling.max_tokens


def orca_policy() -> Policy:
    return Policy("orca", admission=MaxLength(), budget=FullBudget(chunked=False))
