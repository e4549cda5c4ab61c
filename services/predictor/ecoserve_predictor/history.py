"""History features (issue 20 item 1): blend the prompt model with the conversation so far.

In a multi-turn conversation the length of the previous assistant answer predicts the next one
about as well as the prompt model does, and the two are complementary. The chat API hands the
whole conversation to us with every request, so the history costs nothing at prediction time.

A row's history is the conversation's earlier turns, oldest first (`Turn`, or anything with a
`response_tokens` attribute or key, or a bare token count). Turns whose answer length is unknown
(None, negative) are ignored. A row with at least one known earlier answer gets, in log space
(x = log1p):

    log_point = c0 + c1 x(model point) + c2 x(previous answer) + c3 x(mean earlier answer)
                + c4 x(earlier turns)
    log_upper = log_point + upper_shift       (the 0.9 quantile of the fit residuals)

Rows without one keep the model's prediction unchanged. The coefficients are least squares on
the training side of `data.honest_split`, restricted to training conversations and to prompts
the model was not fit on (its `train_prompts.sha256`), so the model's point is as noisy there as
on new traffic. They live in the artifact's meta.json under `history_blend` (`fit_artifact`,
`ecoserve-predictor fit-history`) and `runtime.OnnxPredictor` applies them when present.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = ("bias", "log_model_point", "log_prev_answer", "log_mean_answer", "log_earlier_turns")
QUANTILE = 0.9
META_KEY = "history_blend"
CARD_BULLET = "- **History blend**"
MIN_FIT_ROWS = 50  # below this the fit is refused: five coefficients and a quantile need rows


@dataclass(frozen=True)
class Turn:
    """One earlier exchange of the same conversation: the user's prompt and the answer."""

    prompt: str
    response: str | None
    response_tokens: int | None


def answer_lengths(history: Sequence[object] | None) -> list[float]:
    """The known answer lengths (tokens) of a history, oldest first."""
    out = []
    for t in history or ():
        if isinstance(t, Mapping):
            n = t.get("response_tokens")
        elif isinstance(t, int | float):
            n = t
        else:
            n = getattr(t, "response_tokens", None)
        if n is not None and not isinstance(n, bool) and n >= 0:
            out.append(float(n))
    return out


def earlier_turns(keys: Sequence[str], turns: Sequence[int]) -> list[list[int]]:
    """Per row, the indices of the rows with the same key (conversation) and a lower turn, in
    turn order: the history a row carries (evaluate's files, the blend's fit side)."""
    by_key: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    out: list[list[int]] = [[] for _ in keys]
    for idx in by_key.values():
        idx.sort(key=lambda i: turns[i])
        for i in idx:
            out[i] = [j for j in idx if turns[j] < turns[i]]
    return out


def features(
    log_point: np.ndarray, histories: Sequence[Sequence[object] | None]
) -> tuple[np.ndarray, np.ndarray]:
    """(X [N, len(FEATURES)], has [N] bool): a row's features and whether it has an earlier
    answer (rows without one get zeros, and are not blended)."""
    x = np.zeros((len(histories), len(FEATURES)))
    has = np.zeros(len(histories), dtype=bool)
    for i, h in enumerate(histories):
        lengths = answer_lengths(h)
        if lengths:
            has[i] = True
            x[i] = (
                1.0,
                log_point[i],
                np.log1p(lengths[-1]),
                np.log1p(np.mean(lengths)),
                np.log1p(len(lengths)),
            )
    return x, has


@dataclass(frozen=True)
class HistoryBlend:
    coef: tuple[float, ...]
    upper_shift: float
    fit: dict[str, Any] = field(default_factory=dict)  # how and on what it was fit

    def to_meta(self) -> dict[str, Any]:
        return {
            "features": list(FEATURES),
            "coef": [float(c) for c in self.coef],
            "quantile": QUANTILE,
            "upper_log_shift": float(self.upper_shift),
            "fit": self.fit,
        }

    @classmethod
    def from_meta(cls, entry: Mapping[str, Any]) -> HistoryBlend:
        if list(entry.get("features", ())) != list(FEATURES):
            raise ValueError(f"history_blend features {entry.get('features')} != {FEATURES}")
        coef = tuple(float(c) for c in entry["coef"])
        if len(coef) != len(FEATURES) or not np.all(np.isfinite(coef)):
            raise ValueError(f"history_blend coef {entry['coef']} is not {len(FEATURES)} numbers")
        return cls(coef, float(entry["upper_log_shift"]), dict(entry.get("fit", {})))

    def apply(
        self, point: np.ndarray, upper: np.ndarray, histories: Sequence[Sequence[object] | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(point, upper) with rows that have an earlier answer blended; others untouched."""
        x, has = features(np.log1p(point), histories)
        if not has.any():
            return point, upper
        point, upper = point.copy(), upper.copy()
        log_point = x[has] @ np.asarray(self.coef)
        point[has] = np.expm1(log_point).clip(min=1.0)
        upper[has] = np.maximum(np.expm1(log_point + self.upper_shift), point[has])
        return point, upper


def fit_blend(
    point: np.ndarray,
    true: np.ndarray,
    histories: Sequence[Sequence[object] | None],
    fit: Mapping[str, Any] | None = None,
) -> HistoryBlend:
    """Least squares of log1p(true) on the features, over the rows with an earlier answer;
    the upper shift is the QUANTILE of their residuals."""
    x, has = features(np.log1p(np.asarray(point, dtype=np.float64)), histories)
    if has.sum() < MIN_FIT_ROWS:
        raise ValueError(f"{int(has.sum())} rows with history; the blend needs {MIN_FIT_ROWS}")
    y = np.log1p(np.asarray(true, dtype=np.float64)[has])
    coef, *_ = np.linalg.lstsq(x[has], y, rcond=None)
    shift = float(np.quantile(y - x[has] @ coef, QUANTILE))
    return HistoryBlend(
        tuple(float(c) for c in coef), shift, {"rows": int(has.sum())} | dict(fit or {})
    )


def fit_side(pairs: Sequence[Any], hashes: np.ndarray | None) -> tuple[list[int], list[tuple]]:
    """(indices of the fit rows, per fit row its history) among `pairs`, the training side of
    `honest_split`: rows of training conversations (not moved in from validation or test by
    the dedup) with a history, whose prompt the model was not fit on (when `hashes` is given).
    A row's history is the earlier turns of its record on this same side."""
    from .data import conversation_side
    from .prompt_hashes import seen_in_training

    earlier = earlier_turns([p.record for p in pairs], [p.turn for p in pairs])
    hist = {
        i: tuple(Turn(pairs[j].prompt, None, pairs[j].response_tokens) for j in e)
        for i, e in enumerate(earlier)
        if e
    }
    rows = [i for i in sorted(hist) if conversation_side(pairs[i].group) == 0]
    if hashes is not None and rows:
        seen = seen_in_training([pairs[i].prompt for i in rows], hashes)
        rows = [i for i, s in zip(rows, seen, strict=True) if not s]
    return rows, [hist[i] for i in rows]


def fit_artifact(
    artifact: str | Path, train: Sequence[Any], device: str = "cpu", threads: int = 0
) -> dict[str, Any]:
    """Fit the blend for an artifact on `train` (the training side of honest_split) and write
    it into the artifact's meta.json under META_KEY; returns the entry."""
    from .evaluate import artifact_hashes, by_length
    from .runtime import OnnxPredictor

    path = Path(artifact)
    predictor = OnnxPredictor(path, device, threads)
    hashes = artifact_hashes(predictor, path)
    rows, hist = fit_side(train, hashes)
    prompts = [train[i].prompt for i in rows]
    point, _ = by_length(prompts, lambda idx: predictor.model_predict([prompts[k] for k in idx]))
    true = np.array([train[i].response_tokens for i in rows], dtype=np.float64)
    info = {
        "side": "honest_split train, training conversations only",
        "prompts": "not among the model's fit prompts" if hashes is not None else "all",
    }
    entry = fit_blend(point, true, hist, info).to_meta()
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta[META_KEY] = entry
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    _card_note(path / "MODEL_CARD.md", entry)
    return entry


def _card_note(card: Path, entry: Mapping[str, Any]) -> None:
    """Replace (or add) the model card's history-blend bullet."""
    if not card.is_file():
        return
    lines = card.read_text().splitlines()
    start = next((i for i, x in enumerate(lines) if x.startswith(CARD_BULLET)), len(lines))
    end = start + 1
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    coef = ", ".join(f"{n} {c:+.3f}" for n, c in zip(FEATURES, entry["coef"], strict=True))
    text = (
        f"{CARD_BULLET}: a row with earlier answers in its history gets, in log1p space, "
        f"{coef}; p90 = that + {entry['upper_log_shift']:.3f} (0.9 quantile of the fit "
        f"residuals). Fit on {entry['fit']['rows']} rows: {entry['fit'].get('side', '')}; "
        f"prompts {entry['fit'].get('prompts', '')} (`ecoserve-predictor fit-history`)."
    )
    note = textwrap.wrap(text, 94, subsequent_indent="  ", break_on_hyphens=False)
    card.write_text("\n".join(lines[:start] + note + lines[end:]) + "\n")
