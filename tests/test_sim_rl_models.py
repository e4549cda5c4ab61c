"""Tests of the simulated response-length predictors (oracle, noisy, Alpaca run-to-run)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ecoserve_scheduler.sim import rl_models as m
from ecoserve_scheduler.sim import workload as w
from ecoserve_scheduler.sim.workload import AlpacaLengths, DataMissing, TraceRecord


def records(n: int = 20_000, seed: int = 0) -> list[TraceRecord]:
    recs, _ = w.build_workload("synthetic", 1.0, n, seed=seed)
    return recs


def coverage(model: m.RLModel, recs: list[TraceRecord], seed: int = 0) -> float:
    preds = m.predict_all(model, recs, np.random.default_rng(seed))
    return float(np.mean([p.upper >= r.output_tokens for p, r in zip(preds, recs, strict=True)]))


def toy_alpaca() -> AlpacaLengths:
    rng = np.random.default_rng(9)
    t0 = rng.integers(5, 400, 2000)
    t7 = np.maximum(1, np.rint(t0 * np.exp(rng.normal(0, 0.4, 2000)))).astype(np.int64)
    cols = {c: t0 for c in w.ALPACA_COLUMNS} | {"len_t0.7": t7}
    return AlpacaLengths(np.arange(1, 2001), cols)


def test_prediction_validates():
    assert m.RLPrediction(3, 5).upper == 5
    for point, upper in ((0, 1), (5, 4)):
        with pytest.raises(ValueError):
            m.RLPrediction(point, upper)


def test_oracle_exact():
    oracle = m.make_rl_model("oracle")
    assert oracle.name == "oracle" and isinstance(oracle, m.RLModel)
    for r in records(500):
        p = oracle.predict(r, np.random.default_rng(0))
        assert p.point == p.upper == r.output_tokens


@pytest.mark.parametrize(("sigma", "q"), [(m.DEFAULT_SIGMA, 0.9), (0.3, 0.9), (0.5, 0.5)])
def test_noisy_upper_covers_truth_with_probability_q(sigma, q):
    recs = records()
    assert coverage(m.NoisyRL(sigma, q), recs) == pytest.approx(q, abs=0.015)


def test_noisy_is_unbiased_in_log_and_seeded():
    recs = records()
    model = m.NoisyRL(0.4)
    preds = m.predict_all(model, recs, np.random.default_rng(1))
    again = m.predict_all(model, recs, np.random.default_rng(1))
    assert preds == again
    assert all(p.upper >= p.point >= 1 for p in preds)
    big = [
        (p.point, r.output_tokens) for p, r in zip(preds, recs, strict=True) if r.output_tokens > 50
    ]
    log_err = np.log([pt / true for pt, true in big])
    assert np.median(log_err) == pytest.approx(0.0, abs=0.02)
    assert log_err.std() == pytest.approx(0.4, rel=0.05)
    assert "sigma=0.4" in model.name


def test_noisy_sigma_zero_is_oracle_and_bad_args():
    r = TraceRecord(0.0, 10, 123)
    assert m.NoisyRL(0.0).predict(r, np.random.default_rng(0)) == m.RLPrediction(123, 123)
    with pytest.raises(ValueError):
        m.NoisyRL(-0.1)
    with pytest.raises(ValueError):
        m.NoisyRL(0.5, upper_quantile=1.0)


def test_fit_alpaca_sigma_on_toy_data():
    data = toy_alpaca()
    expected = np.log(data["len_t0.7"] / data["len_t0.0"]).std()
    assert m.fit_alpaca_sigma(data) == pytest.approx(expected)
    assert 0.3 < m.fit_alpaca_sigma(data) < 0.5


def test_alpaca_run_to_run_on_toy_data():
    data = toy_alpaca()
    model = m.AlpacaRunToRunRL(data, upper_quantile=0.8)
    rng = np.random.default_rng(0)
    recs = [TraceRecord(0.0, 5, int(data["len_t0.7"][i]), alpaca_row=i) for i in range(len(data))]
    preds = m.predict_all(model, recs, rng)
    assert [p.point for p in preds] == data["len_t0.0"].tolist()
    assert coverage(model, recs) == pytest.approx(0.8, abs=0.02)
    other = model.predict(TraceRecord(0.0, 5, 100), rng)  # no alpaca_row: noisy fallback
    assert other.upper >= other.point >= 1
    assert model.fallback.sigma == pytest.approx(m.fit_alpaca_sigma(data))


def test_make_rl_model_names(tmp_path):
    assert isinstance(m.make_rl_model("noisy"), m.NoisyRL)
    assert m.make_rl_model("noisy").sigma == m.DEFAULT_SIGMA
    assert m.make_rl_model("noisy", sigma=0.2, upper_quantile=0.95).upper_quantile == 0.95
    with pytest.raises(DataMissing, match="alpaca_vicuna7b_response_lengths.csv"):
        m.make_rl_model("alpaca", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown RL model"):
        m.make_rl_model("crystal-ball")


def test_spearman():
    a = np.arange(50)
    assert m.spearman(a, a**3) == pytest.approx(1.0)
    assert m.spearman(a, -a) == pytest.approx(-1.0)
    # ties get their average rank: ranks (0.5, 0.5, 2, 3) vs (0, 1, 2, 3)
    assert m.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(m.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        m.spearman([1, 2], [1, 2, 3])


def alpaca_data() -> AlpacaLengths:
    try:
        return w.load_alpaca_lengths()
    except DataMissing:
        pytest.skip(f"../shared/data absent: {w.ALPACA_FILE} not found in {w.data_dir()}")


def test_default_sigma_matches_data():
    assert m.fit_alpaca_sigma(alpaca_data()) == pytest.approx(m.DEFAULT_SIGMA, abs=5e-5)


def test_spearman_matches_readme_on_alpaca():
    data = alpaca_data()
    assert m.spearman(data["len_t0.0"], data["len_t0.3"]) == pytest.approx(0.90, abs=0.005)
    assert m.spearman(data["len_t0.5"], data["len_t0.7"]) == pytest.approx(0.81, abs=0.005)


def test_alpaca_model_on_real_workload():
    alpaca_data()
    recs, _ = w.build_workload("alpaca", 1.0, 10_000, seed=0)
    model = m.make_rl_model("alpaca")
    assert coverage(model, recs) == pytest.approx(0.9, abs=0.015)
    preds = m.predict_all(model, recs, np.random.default_rng(0))
    rho = m.spearman([p.point for p in preds], [r.output_tokens for r in recs])
    assert 0.7 < rho < 0.9  # another run of the same model ranks lengths well, not perfectly
