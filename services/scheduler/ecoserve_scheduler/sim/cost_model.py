"""Fitting the iteration-time model (`ecoserve_common.cost`) to measured step timings.

The model, its profiles and their shipped JSON files live in the contract package, where the
simulator and the worker's sim backend both read them; this module only produces profiles.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecoserve_common.cost import (
    COEFFICIENTS,
    CostModel,
    Profile,
    list_profiles,
    load_profile,
    profile_filename,
    save_profile,
)
from ecoserve_common.plan import BatchShape

__all__ = [
    "COEFFICIENTS",
    "CostModel",
    "Profile",
    "fit_profile",
    "list_profiles",
    "load_profile",
    "load_timings",
    "profile_filename",
    "save_profile",
    "shape_from_row",
]


def load_timings(path: str | Path) -> list[dict[str, Any]]:
    """Measured step timings from a JSONL (one object per line) or CSV file."""
    path = Path(path)
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _number(text: str) -> Any:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def shape_from_row(row: Mapping[str, Any]) -> BatchShape:
    """The BatchShape a timing row describes. A row may list its chunks as `prefill_chunks`
    [[tokens, context], ...]; otherwise its prefill is one chunk of `prefill_tokens` after
    `prefill_context_tokens` cached ones (the worker times one step, whatever it held)."""
    chunks = row.get("prefill_chunks")
    if chunks is None:
        tokens = int(row.get("prefill_tokens") or 0)
        chunks = [(tokens, int(row.get("prefill_context_tokens") or 0))] if tokens else []
    return BatchShape(
        tuple((int(c), int(ctx)) for c, ctx in chunks),
        int(row.get("decode_seqs") or 0),
        int(row.get("decode_context_tokens") or 0),
    )


def _features(shape: BatchShape) -> tuple[float, ...]:
    """(total tokens, then the column of each COEFFICIENTS entry) for one timed step."""
    chunks = shape.prefill_chunks
    prefill = float(sum(c for c, _ in chunks))
    cross = float(sum(c * ctx for c, ctx in chunks))
    half_square = float(sum(c * c for c, _ in chunks)) / 2.0
    decode_seqs = float(shape.decode_seqs)
    decode_ctx = float(shape.decode_context_tokens)
    # c0, s_tok (placeholder: its column depends on the knee), p_tok, a_dec, a_dseq, p_lin, p_quad
    return (prefill + decode_seqs, 1.0, 0.0, prefill, decode_ctx, decode_seqs, cross, half_square)


def _knee_basis(knee: float, tokens: Sequence[float], p: float | None) -> list[float]:
    """knee(w, s*T) == s * knee(K, T) with K = w / s: linear in s once the knee K is fixed."""
    if p is None:
        return [max(knee, t) for t in tokens]
    return [(knee**p + t**p) ** (1.0 / p) for t in tokens]


@dataclass
class _Fit:
    sse: float
    knee: float
    p: float | None
    coef: dict[str, float]


def _solve(x0, y, knee: float, p: float | None, free: list[str], fixed: dict[str, float]):
    """Non-negative least squares in relative error for one knee position."""
    import numpy as np
    from scipy.optimize import nnls

    x = x0.copy()
    x[:, 2] = _knee_basis(knee, x[:, 0].tolist(), p)
    cols = {name: x[:, i + 1] for i, name in enumerate(COEFFICIENTS)}
    rhs = y - sum((fixed[n] * cols[n] for n in fixed), np.zeros_like(y))
    a = np.stack([cols[n] for n in free], axis=1) / y[:, None]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    sol, _ = nnls(a / scale, rhs / y)
    sol = sol / scale
    pred = y - rhs + a @ sol * y
    sse = float(np.sum((pred / y - 1.0) ** 2))
    return _Fit(sse, knee, p, {**fixed, **dict(zip(free, sol.tolist(), strict=True))})


def _best_knee(x, y, p, free, fixed, lo: float, hi: float) -> _Fit:
    """Scan knee positions on a log grid, then refine the best one with a bounded 1-D search."""
    import numpy as np
    from scipy.optimize import minimize_scalar

    grid = np.geomspace(lo, hi, 160)
    fits = [_solve(x, y, k, p, free, fixed) for k in grid]
    i = min(range(len(fits)), key=lambda j: fits[j].sse)
    a, b = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])
    res = minimize_scalar(
        lambda lk: _solve(x, y, math.exp(lk), p, free, fixed).sse,
        bounds=(a, b),
        method="bounded",
        options={"xatol": 1e-4},
    )
    refined = _solve(x, y, math.exp(res.x), p, free, fixed)
    return refined if refined.sse <= fits[i].sse else fits[i]


KNEE_P_GRID: tuple[float | None, ...] = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, None)


def fit_profile(
    base: Profile,
    rows: Iterable[Mapping[str, Any]] | str | Path,
    *,
    fixed: Iterable[str] = (),
    fit_knee_p: bool = False,
    source: str = "measured step timings",
) -> Profile:
    """Least-squares fit of the iteration-time coefficients to measured step timings.

    Rows are dicts with prefill_tokens, prefill_context_tokens (optional), decode_seqs,
    decode_context_tokens and latency_s (or a path to a JSONL/CSV of them). The error minimised
    is relative, so 10 ms decode steps count as much as 300 ms prefills. The knee term becomes
    linear once its position K = w_mem / s_tok is fixed, so K is scanned (and knee_p over
    KNEE_P_GRID when fit_knee_p) with a non-negative least-squares solve at each point.
    Coefficients named in `fixed`, and those the rows carry no signal for (e.g. p_lin when no row
    has cached prefill context), keep the base profile's values.
    """
    import numpy as np

    if isinstance(rows, (str, Path)):
        rows = load_timings(rows)
    rows = list(rows)
    if not rows:
        raise ValueError("fit_profile needs at least one timing row")
    shapes = [shape_from_row(r) for r in rows]
    x = np.array([_features(s) for s in shapes])
    y = np.array([float(r["latency_s"]) for r in rows])
    if np.any(y <= 0):
        raise ValueError("latency_s must be positive")
    pinned = set(fixed)
    fixable = [n for n in COEFFICIENTS if n != "s_tok"]  # s_tok and the knee are always fitted
    if pinned - set(fixable):
        raise ValueError(f"cannot fix {sorted(pinned - set(fixable))}; fixable: {fixable}")
    silent = {n for i, n in enumerate(COEFFICIENTS) if n != "s_tok" and not np.any(x[:, i + 1])}
    fixed_vals = {n: getattr(base, n) for n in COEFFICIENTS if n in pinned | silent}
    free = [n for n in COEFFICIENTS if n not in fixed_vals]
    p_grid = KNEE_P_GRID if fit_knee_p else (base.knee_p,)
    tokens = x[:, 0]
    lo, hi = 1.0, 4.0 * float(tokens.max())
    fit = min((_best_knee(x, y, p, free, fixed_vals, lo, hi) for p in p_grid), key=lambda f: f.sse)
    coef = fit.coef
    fitted = dataclasses.replace(base, **coef, w_mem=coef["s_tok"] * fit.knee, knee_p=fit.p)
    model = CostModel(fitted)
    pred = np.array([model.iteration_time(s) for s in shapes])
    error = float(np.mean(np.abs(pred / y - 1.0)))
    note = f"fit_profile: least squares on {len(rows)} {source} (mean relative error {error:.1%})"
    sources = dict(base.sources)
    for name in [*free, "w_mem", *(["knee_p"] if fit_knee_p else [])]:
        sources[name] = note
    return dataclasses.replace(fitted, fit_rel_error=round(error, 6), sources=sources)
