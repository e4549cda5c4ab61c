"""Shortest predicted response first, on vLLM-style on-demand paging.

Source of truth: no single system. Shortest-predicted-job-first is the baseline of the
length-prediction schedulers (e.g. Zheng et al., "Response Length Perception and Sequence
Scheduling", NeurIPS 2023; Qiu et al., "Efficient Interactive LLM Serving with Proxy
Model-based Sequence Length Prediction", 2024; Fu et al., "Efficient LLM Scheduling by Learning
to Rank", 2024), put on the same engine as `vllm` (vllm.py: v1-style chunked prefill, blocks
on demand, 1% watermark) so that only the order differs. The waiting queue is ordered by
predicted response length (the same predictor EcoServe uses), FCFS among equals; under memory
pressure the running request with the longest predicted remaining output is preempted
(recompute). No reservation, no aging: starvation of long requests is this baseline's known
weakness (the papers above add aging or ranking; this one does not).
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
