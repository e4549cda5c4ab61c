"""Accuracy of a length predictor on a validation split, and the two baselines it must beat."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata, spearmanr

from ecoserve_common.buckets import DEFAULT_EDGES

from .features import bucket_of


def evaluate(
    point: Sequence[float],
    upper: Sequence[float],
    true: Sequence[int],
    edges: Sequence[int] = DEFAULT_EDGES,
) -> dict[str, float]:
    """spearman (of point vs true; 0 for a constant predictor), mae (tokens), within_1_bucket
    (share whose predicted bucket is at most one off), coverage_upper (share true <= upper)."""
    point, upper, true = (np.asarray(a, dtype=np.float64) for a in (point, upper, true))
    rho = 0.0 if np.ptp(point) == 0 else float(spearmanr(point, true).statistic)
    off = np.abs(bucket_of(point, edges) - bucket_of(true, edges))
    return {
        "spearman": rho,
        "mae": float(np.mean(np.abs(point - true))),
        "within_1_bucket": float(np.mean(off <= 1)),
        "coverage_upper": float(np.mean(true <= upper)),
        "n": int(len(true)),
    }


def baselines(
    train_prompt_tokens: np.ndarray,
    train_lengths: np.ndarray,
    val_prompt_tokens: np.ndarray,
    val_lengths: np.ndarray,
    edges: Sequence[int] = DEFAULT_EDGES,
) -> dict[str, dict[str, float]]:
    """global_median: the training median for all, p90 as the upper bound.
    prompt_length_regression: least squares of log length on log prompt tokens, upper = fit +
    the 0.9 quantile of the training residuals."""
    med, p90 = np.median(train_lengths), np.quantile(train_lengths, 0.9)
    n = len(val_lengths)
    out = {"global_median": evaluate(np.full(n, med), np.full(n, p90), val_lengths, edges)}
    x, y = np.log1p(train_prompt_tokens), np.log1p(train_lengths)
    slope, intercept = np.polyfit(x, y, 1)
    resid_q90 = np.quantile(y - (slope * x + intercept), 0.9)
    fit = slope * np.log1p(val_prompt_tokens) + intercept
    out["prompt_length_regression"] = evaluate(
        np.expm1(fit), np.expm1(fit + resid_q90), val_lengths, edges
    )
    return out


# Elements per block of resamples: bounds memory on large files (a [B, n] index array at a time).
_BLOCK = 2_000_000


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman of each row pair of two [B, n] arrays (average ranks for ties; 0 for a row
    that is constant, as `evaluate` gives a constant predictor)."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    return np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1.0), 0.0)


def bootstrap_ci(
    point: Sequence[float],
    upper: Sequence[float],
    true: Sequence[int],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals ([low, high]) of spearman, mae and coverage_upper: rows
    resampled with replacement `resamples` times (seeded, so a rerun gives the same bounds)."""
    p, u, t = (np.asarray(a, dtype=np.float64) for a in (point, upper, true))
    n = len(t)
    rng = np.random.default_rng(seed)
    err, covered = np.abs(p - t), (t <= u).astype(np.float64)
    parts: dict[str, list[np.ndarray]] = {"spearman": [], "mae": [], "coverage_upper": []}
    per_block = max(1, _BLOCK // max(n, 1))
    for start in range(0, resamples, per_block):
        idx = rng.integers(0, n, size=(min(per_block, resamples - start), n))
        parts["spearman"].append(_spearman_rows(p[idx], t[idx]))
        parts["mae"].append(err[idx].mean(axis=1))
        parts["coverage_upper"].append(covered[idx].mean(axis=1))
    tail = 50.0 * (1.0 - level)
    out = {}
    for name, blocks in parts.items():
        lo, hi = np.percentile(np.concatenate(blocks), [tail, 100.0 - tail])
        out[name] = [float(lo), float(hi)]
    return out
