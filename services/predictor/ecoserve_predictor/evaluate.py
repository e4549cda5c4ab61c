"""`ecoserve-predictor evaluate`: an artifact's accuracy on a file of prompt/length pairs.

The file is JSONL (gzip when it ends in .gz) in the shared ShareGPT format: one pair a line
with `id` (record id), `turn` (index of the message in the record; 0: it opens it), `prompt` and
`response_tokens` (the label); `response` and other fields may be present. Each pair's history
is the earlier turns of the same `id` in the file (read when the artifact has a fit
`history_blend`: history.py). The model runs through ONNX Runtime as in
serving (runtime.OnnxPredictor), in batches of similar prompt length.

It reports spearman, mae, within_1_bucket, coverage_upper and n overall and for slices:
`first_turn` (turn 0), `later_turns`, `unseen_prompt` (normalised text not among the artifact's
training prompts, exactly, from its hash file) and `seen_prompt`, each with seeded percentile
bootstrap 95% intervals. A slice under MIN_ROWS rows reports its n and null metrics.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .history import Turn, earlier_turns
from .metrics import bootstrap_ci, evaluate
from .prompt_hashes import NORMALISATION, load_hashes, seen_in_training
from .runtime import OnnxPredictor, Predictions

REQUIRED = ("id", "turn", "prompt", "response_tokens")
MIN_ROWS = 30  # below this a rank correlation (and its interval) is noise
BATCH = 256


class InputError(ValueError):
    """A data file evaluate cannot use; the CLI prints the message and exits 2."""


@dataclass(frozen=True)
class Row:
    id: str
    turn: int
    prompt: str
    response_tokens: int
    response: str | None = None


def _parse(r: object, where: str) -> Row:
    if not isinstance(r, dict):
        raise InputError(f"{where}: not a JSON object")
    missing = [k for k in REQUIRED if r.get(k) is None]
    if missing:
        hint = ""
        if "response_tokens" in missing and r.get("response") is not None:
            hint = " (the label is the response's token count; `response` text is not counted)"
        raise InputError(f"{where}: missing {', '.join(missing)}{hint}")
    prompt = r["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: prompt is empty or not text")
    try:
        turn, label = int(r["turn"]), int(r["response_tokens"])
    except (TypeError, ValueError):
        raise InputError(f"{where}: turn and response_tokens must be integers") from None
    response = r.get("response")
    return Row(str(r["id"]), turn, prompt, label, response if isinstance(response, str) else None)


def read_rows(path: str | Path) -> list[Row]:
    """The file's pairs in order; InputError (naming the line) for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    rows = []
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{where}: not JSON ({exc.msg})") from None
                rows.append(_parse(r, where))
    except (OSError, UnicodeDecodeError, EOFError) as exc:  # bad gzip, bad encoding
        raise InputError(f"{path}: unreadable ({exc})") from None
    if not rows:
        raise InputError(f"{path}: no pairs")
    return rows


def histories(rows: list[Row]) -> list[tuple[Turn, ...]]:
    """Per row, the rows of the same id with a lower turn, in turn order."""
    earlier = earlier_turns([r.id for r in rows], [r.turn for r in rows])
    return [
        tuple(Turn(rows[j].prompt, rows[j].response, rows[j].response_tokens) for j in e)
        for e in earlier
    ]


def by_length(
    prompts: list[str], run: Callable[[list[int]], Predictions], batch: int = BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """(point, upper) per prompt in order, `run` given the indices of one batch at a time:
    batches of similar length pad little."""
    point, upper = np.empty(len(prompts)), np.empty(len(prompts))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        r = run(idx)
        point[idx], upper[idx] = r.point, r.upper
    return point, upper


def predict(
    predictor: OnnxPredictor, rows: list[Row], hist: list[tuple[Turn, ...]], batch: int = BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """(point, upper) per row, in the file's order."""
    prompts = [r.prompt for r in rows]
    return by_length(
        prompts, lambda idx: predictor.predict([prompts[i] for i in idx], [hist[i] for i in idx]),
        batch,
    )  # fmt: skip


def _report(point, upper, true, edges, resamples: int, seed: int) -> dict[str, Any]:
    n = len(true)
    if n < MIN_ROWS:
        nulls = ("spearman", "mae", "within_1_bucket", "coverage_upper", "ci95")
        return {"n": n, **dict.fromkeys(nulls)}
    out: dict[str, Any] = dict(evaluate(point, upper, true, edges))
    out["ci95"] = bootstrap_ci(point, upper, true, resamples, seed)
    return out


def evaluate_rows(
    predictor: OnnxPredictor,
    rows: list[Row],
    hashes: np.ndarray | None,
    resamples: int = 1000,
    seed: int = 0,
    batch: int = BATCH,
) -> dict[str, Any]:
    """Overall metrics at the top level, one entry per slice, and how many later turns found
    none of their earlier turns in the file (their history is lost to a history-aware model)."""
    hist = histories(rows)
    point, upper = predict(predictor, rows, hist, batch)
    true = np.array([r.response_tokens for r in rows], dtype=np.float64)
    first = np.array([r.turn == 0 for r in rows])
    slices = {"first_turn": first, "later_turns": ~first}
    if hashes is not None:
        seen = seen_in_training([r.prompt for r in rows], hashes)
        slices |= {"unseen_prompt": ~seen, "seen_prompt": seen}

    def report(mask: np.ndarray) -> dict[str, Any]:
        return _report(point[mask], upper[mask], true[mask], predictor.edges, resamples, seed)

    out = report(np.ones(len(rows), dtype=bool))
    for name, mask in slices.items():
        out[name] = report(mask)
    if hashes is None:
        why = "the artifact has no training prompt hashes (train_prompts.sha256)"
        for name in ("unseen_prompt", "seen_prompt"):
            out[name] = {"n": None, "note": why}
    lost = sum(r.turn > 0 and not h for r, h in zip(rows, hist, strict=True))
    out["history"] = {
        "rows_with_history": sum(map(bool, hist)),
        "later_turns_without": lost,
        "blend": predictor.history_blend is not None,  # history.py: read only when fit
    }
    out["bootstrap"] = {"resamples": resamples, "seed": seed, "level": 0.95, "min_rows": MIN_ROWS}
    return out


def artifact_hashes(predictor: OnnxPredictor, artifact: str | Path) -> np.ndarray | None:
    """The artifact's training-prompt hashes, if made with the normalisation used here."""
    made_with = predictor.meta.get("prompt_hashes", {}).get("normalisation", NORMALISATION)
    return load_hashes(artifact) if made_with == NORMALISATION else None


def evaluate_file(
    data: str | Path,
    artifact: str | Path,
    device: str = "auto",
    threads: int = 0,
    resamples: int = 1000,
    seed: int = 0,
    batch: int = BATCH,
) -> dict[str, Any]:
    rows = read_rows(data)  # before loading the model: a bad file fails fast
    predictor = OnnxPredictor(artifact, device, threads)
    result = evaluate_rows(
        predictor, rows, artifact_hashes(predictor, artifact), resamples, seed, batch
    )
    return {"data": str(data), "artifact": str(artifact), "model_id": predictor.model_id} | result
