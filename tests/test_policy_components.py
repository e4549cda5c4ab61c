"""Shared builders for the policy component tests (no core: hooks get a Step, nothing else)."""

from __future__ import annotations

import math

from ecoserve_scheduler.core import SLO, KVLedger, Request, SamplingParams, WorkerSpec
from ecoserve_scheduler.core.state import WorkerState
from ecoserve_scheduler.core.step import Step


def req(rid: str, prompt: int = 32, predicted: int = 10, **kw: object) -> Request:
    deadline = kw.pop("deadline", math.inf)
    upper = kw.pop("upper", predicted)
    max_tokens = kw.pop("max_tokens", 1000)
    return Request(
        rid,
        prompt_len=prompt,
        arrival_s=float(kw.pop("arrival", 0.0)),  # type: ignore[arg-type]
        sampling=SamplingParams(max_tokens=max_tokens),  # type: ignore[arg-type]
        slo=SLO(jct_deadline_s=deadline),  # type: ignore[arg-type]
        predicted_rl=predicted,
        predicted_rl_upper=upper,  # type: ignore[arg-type]
    )


def step_of(
    num_blocks: int = 64, token_budget: int = 256, now: float = 0.0, iter_s: float = 0.0
) -> Step:
    spec = WorkerSpec("w0", num_blocks, 16, token_budget)
    w = WorkerState(spec, KVLedger(num_blocks, 16))
    return Step(w, now, iter_s, {"w0": w})


def test_builders() -> None:
    s = step_of()
    assert s.budget == 256 and not s.running and req("a").pending == 32
