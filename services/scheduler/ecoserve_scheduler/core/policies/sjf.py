"""Shortest predicted response first, on vLLM-style on-demand paging.

The waiting queue is ordered by predicted response length (the same predictor EcoServe uses),
FCFS among equals; under memory pressure the running request with the longest predicted
remaining output is preempted (recompute). No reservation, no aging: starvation of long
requests is this baseline's known weakness.
"""

from __future__ import annotations

from ..core import Step
from ..queues import KeyedQueue
from ..request import Request
from .base import Policy


class SJFPolicy(Policy):
    name = "sjf"
    headroom_share = 0.01

    def make_queue(self):
        return KeyedQueue(lambda r: (r.predicted_rl, r.arrival_s))

    def victim(self, step: Step, r: Request) -> Request | None:
        """The running request with the longest predicted remaining output (may be r)."""
        return max(step.running.values(), key=lambda o: o.predicted_rl - o.num_output, default=None)
