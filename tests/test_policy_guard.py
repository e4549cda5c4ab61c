"""EcoServe component (d): the SLO guard on prefill budget and admissions."""

from __future__ import annotations

import math

from test_policy_components import req, step_of

from ecoserve_scheduler.core import Status
from ecoserve_scheduler.core.policies.guard import GuardConfig, SloGuard


def trained(step, per_token_s: float = 1e-4, per_ctx_s: float = 1e-6) -> None:
    model = step.w.iter_model
    for i in range(64):
        tokens, ctx = 32 + 16 * (i % 8), 1000 * (i % 5)
        model.observe(tokens, ctx, 0.01 + per_token_s * tokens + per_ctx_s * ctx)
    assert model.ready


def decoding_step(deadline: float, n: int = 8):
    s = step_of(num_blocks=400, token_budget=2048, now=0.0)
    for i in range(n):
        r = req(f"d{i}", predicted=100, deadline=deadline)
        r.status, r.num_computed = Status.RUNNING, 500
        r.output_token_ids.append(1)
        s.running[r.request_id] = s.w.decoding[r.request_id] = r
        s.ledger.allocate(r.request_id, 40)
        s.ledger.advance(r.request_id, 500)
    s.run_decodes(list(s.w.decoding.values()))
    s.context_tokens = sum(r.num_computed for r in s.decode_reqs)
    return s


def test_untrained_or_without_deadlines_the_budget_is_untouched() -> None:
    guard = SloGuard()
    s = decoding_step(deadline=math.inf)
    assert guard.prefill_budget(s) == s.budget
    trained(s)
    assert guard.prefill_budget(s) == s.budget and guard.admits(s, req("new", prompt=10_000))


def test_tight_deadlines_cap_the_prefill_budget_at_the_minimum() -> None:
    guard = SloGuard(GuardConfig(guard_min_prefill=64))
    s = decoding_step(deadline=1.0)  # ~0.01 s per remaining token: below the fixed step cost
    trained(s)
    assert guard.prefill_budget(s) == 64


def test_a_request_whose_context_crosses_the_target_is_not_admitted() -> None:
    guard = SloGuard(GuardConfig(guard_min_prefill=16))
    s = decoding_step(deadline=2.5)
    trained(s, per_ctx_s=2e-6)
    budget = guard.prefill_budget(s)
    assert 16 <= budget < s.budget
    assert guard.admits(s, req("small", prompt=16))
    assert not guard.admits(s, req("huge", prompt=200_000))
