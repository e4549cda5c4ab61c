"""Accuracy of a length predictor on a validation split, and the two baselines it must beat."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr

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
