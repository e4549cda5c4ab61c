"""Shortest predicted response first, on vLLM-style on-demand paging.

The waiting queue is ordered by predicted response length (the same predictor EcoServe uses),
FCFS among equals; under memory pressure the running request with the longest predicted
remaining output is preempted (recompute). No reservation, no aging: starvation of long
requests is this baseline's known weakness.
"""

from __future__ import annotations

from ..request import Request
from ..step import Step
from .base import KeyedOrder, OnDemand, Policy


class LongestRemaining:
    def victim(self, step: Step, r: Request) -> Request | None:
        return max(step.running.values(), key=lambda o: o.predicted_rl - o.num_output, default=None)


def sjf_policy() -> Policy:
    queue = KeyedOrder(lambda r: (r.predicted_rl, r.arrival_s))
    return Policy("sjf", queue, OnDemand(headroom_share=0.01), victims=LongestRemaining())
