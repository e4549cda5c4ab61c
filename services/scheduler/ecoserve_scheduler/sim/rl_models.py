"""Predicted response length (RL) for simulated requests.

The scheduler reserves KV cache for the prompt plus the padded prediction (`upper`), so how wrong
the predictor is decides how often a reservation overflows. These models stand in for the real
predictor in the simulator: an oracle, log-normal noise of a chosen size, and the run-to-run
noise measured on Vicuna-7B (the data README, section 4), a ceiling for any predictor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Protocol, runtime_checkable

import numpy as np

from .workload import AlpacaLengths, TraceRecord, load_alpaca_lengths

# Std of log(len_t0.7 / len_t0.0) over the 20,000 rows of alpaca_vicuna7b_response_lengths.csv
# (numpy std, ddof=0): 0.58825. It is how far one Vicuna-7B run's length lies from another run's
# for the same prompt, so a predictor that is as good as "rerun the model" has about this sigma.
# Recompute with fit_alpaca_sigma(load_alpaca_lengths()).
DEFAULT_SIGMA = 0.58825
DEFAULT_UPPER_QUANTILE = 0.9
RL_MODELS = ("oracle", "noisy", "alpaca")


@dataclass(frozen=True)
class RLPrediction:
    """A point estimate of the output tokens and the padded value KV is reserved for."""

    point: int
    upper: int

    def __post_init__(self) -> None:
        if not self.upper >= self.point >= 1:
            raise ValueError(f"need upper >= point >= 1, got point={self.point} upper={self.upper}")


@runtime_checkable
class RLModel(Protocol):
    """What the simulator asks of a predictor: a name for reports and one prediction a record."""

    name: str

    def predict(self, record: TraceRecord, rng: np.random.Generator) -> RLPrediction: ...


def _prediction(point: float, upper_factor: float) -> RLPrediction:
    """Round to tokens, keeping point >= 1 and upper >= point."""
    p = max(1, round(point))
    return RLPrediction(p, max(p, round(p * upper_factor)))


@dataclass(frozen=True)
class OracleRL:
    """Knows the true length: the best case for exact reservation."""

    name: str = field(default="oracle", init=False)

    def predict(self, record: TraceRecord, rng: np.random.Generator) -> RLPrediction:
        return RLPrediction(record.output_tokens, record.output_tokens)


@dataclass(frozen=True)
class NoisyRL:
    """Log-normal error: point = true * exp(N(0, sigma)), upper = point * exp(z_q * sigma).

    Because log(upper / true) ~ N(z_q * sigma, sigma), upper >= true with probability ~q (up to
    rounding), which is what a calibrated q-quantile predictor would give.
    """

    sigma: float = DEFAULT_SIGMA
    upper_quantile: float = DEFAULT_UPPER_QUANTILE
    name: str = field(init=False)

    def __post_init__(self) -> None:
        if self.sigma < 0 or not 0 < self.upper_quantile < 1:
            raise ValueError(
                f"need sigma >= 0 and 0 < q < 1, got {self.sigma}, {self.upper_quantile}"
            )
        object.__setattr__(
            self, "name", f"noisy(sigma={self.sigma:.3g}, q={self.upper_quantile:g})"
        )

    @property
    def upper_factor(self) -> float:
        return math.exp(NormalDist().inv_cdf(self.upper_quantile) * self.sigma)

    def predict(self, record: TraceRecord, rng: np.random.Generator) -> RLPrediction:
        point = record.output_tokens * math.exp(rng.normal(0.0, self.sigma))
        return _prediction(point, self.upper_factor)


def fit_alpaca_sigma(data: AlpacaLengths) -> float:
    """Std of log(len_t0.7 / len_t0.0) over prompts: measured run-to-run RL noise."""
    return float(np.std(_alpaca_log_ratio(data)))


def _alpaca_log_ratio(data: AlpacaLengths) -> np.ndarray:
    t0, t7 = (np.maximum(data[c], 1).astype(float) for c in ("len_t0.0", "len_t0.7"))
    return np.log(t7 / t0)


class AlpacaRunToRunRL:
    """Predicts with another real run of the same model on the same prompt.

    For a record with `alpaca_row`, point = that prompt's len_t0.0 (the workload's truth is
    len_t0.7) and upper = point * exp(q-quantile of log(len_t0.7 / len_t0.0)), an empirical pad
    that covers the truth for a fraction ~q of prompts. Other records get NoisyRL with the
    fitted sigma.
    """

    def __init__(self, data: AlpacaLengths, upper_quantile: float = DEFAULT_UPPER_QUANTILE):
        self.point_lengths = data["len_t0.0"]
        log_ratio = _alpaca_log_ratio(data)
        self.upper_factor = math.exp(float(np.quantile(log_ratio, upper_quantile)))
        self.fallback = NoisyRL(float(np.std(log_ratio)), upper_quantile)
        self.name = f"alpaca-run-to-run(q={upper_quantile:g})"

    def predict(self, record: TraceRecord, rng: np.random.Generator) -> RLPrediction:
        if record.alpaca_row is None:
            return self.fallback.predict(record, rng)
        return _prediction(int(self.point_lengths[record.alpaca_row]), self.upper_factor)


def make_rl_model(
    name: str,
    data_dir: str | Path | None = None,
    *,
    sigma: float = DEFAULT_SIGMA,
    upper_quantile: float = DEFAULT_UPPER_QUANTILE,
) -> RLModel:
    """Build an RL model by name; "alpaca" reads the data and raises DataMissing without it."""
    if name == "oracle":
        return OracleRL()
    if name == "noisy":
        return NoisyRL(sigma, upper_quantile)
    if name == "alpaca":
        return AlpacaRunToRunRL(load_alpaca_lengths(data_dir), upper_quantile)
    raise ValueError(f"unknown RL model {name!r}; choose from {RL_MODELS}")


def predict_all(
    model: RLModel, records: list[TraceRecord], rng: np.random.Generator
) -> list[RLPrediction]:
    """Predictions for a whole trace, in order (one rng stream, so seeded runs repeat)."""
    return [model.predict(r, rng) for r in records]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson of tie-averaged ranks); nan if either is constant."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two sequences of equal length >= 2, got {len(a)} and {len(b)}")
    ra, rb = _ranks(a) - (len(a) - 1) / 2, _ranks(b) - (len(b) - 1) / 2
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / denom if denom > 0 else math.nan
