"""The learned iteration-time model recovers a linear step-time law and answers inversions."""

from __future__ import annotations

import random

import pytest

from ecoserve_scheduler.core.iter_model import IterTimeModel


def law(tokens: int, ctx: int) -> float:
    return 0.004 + 6e-5 * tokens + 2.5e-7 * ctx


def test_not_ready_until_enough_samples():
    m = IterTimeModel(min_samples=32)
    for i in range(31):
        m.observe(100 + i, 10_000, law(100 + i, 10_000))
    assert not m.ready and m.predict(100, 0) == 0.0


def test_recovers_coefficients_and_inverts():
    rng = random.Random(0)
    m = IterTimeModel()
    for _ in range(400):
        t, c = rng.randint(1, 1024), rng.randint(0, 200_000)
        m.observe(t, c, law(t, c) * (1 + rng.uniform(-0.01, 0.01)))
    assert m.ready
    a, b, c = m.coef
    assert a == pytest.approx(0.004, rel=0.1)
    assert b == pytest.approx(6e-5, rel=0.05)
    assert c == pytest.approx(2.5e-7, rel=0.05)
    budget = m.max_tokens(50_000, 0.05)
    assert m.predict(budget, 50_000) <= 0.05 < m.predict(budget + 2, 50_000)


def test_forgets_old_hardware():
    m = IterTimeModel(forget=0.98)
    for i in range(300):
        m.observe(i % 500 + 1, (i * 37) % 90_000, law(i % 500 + 1, (i * 37) % 90_000))
    for i in range(600):  # the machine got twice as slow
        t, c = i % 500 + 1, (i * 37) % 90_000
        m.observe(t, c, 2 * law(t, c))
    assert m.predict(256, 40_000) == pytest.approx(2 * law(256, 40_000), rel=0.05)
