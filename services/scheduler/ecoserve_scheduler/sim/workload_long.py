"""Long-context workloads from the ShareGPT pairs: regimes where the KV cache, not compute, binds.

Both are registered in `sim.workload.WORKLOADS` (so `build_workload(name, ...)`, `sweep.workload`
and the CLI's `--trace` find them) and read the same `sharegpt_v3_pairs.jsonl.gz` as "sharegpt";
without it they raise `DataMissing` (no synthetic fallback: their point is the real long tail).

* `sharegpt_long`: the longest requests. Input = history + prompt tokens (what a stateless chat
  API sees, as "sharegpt"), output = response tokens, both capped to the context with
  `cap_lengths`; only rows whose capped input + output is at or above the `LONG_PERCENTILE`-th
  percentile of all rows are drawn.
* `sharegpt_multiturn`: later turns of conversations, each carrying the conversation so far. A
  conversation is a ShareGPT record id with its split suffix dropped: the V3 "split" file cuts a
  long conversation into records `<conv>_<first message index>` (e.g. hRPPgZT_0, hRPPgZT_11),
  which are joined again in that order, then by `turn`. A pair's input = the prompt and response
  tokens of every earlier pair in its conversation + its own prompt tokens, capped with
  `cap_lengths` (history is cut first, as a client truncating old turns to fit the context);
  only pairs with at least one earlier pair are drawn. Messages that formed no pair (a lone
  message at a record boundary) are not counted, so histories are slightly short.

Arrivals are independent (Poisson or gamma, as every length-only workload): the next turn of a
conversation does not wait for the previous answer.
"""

from __future__ import annotations

import gzip
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .trace import LengthSample, cap_lengths

LONG_WORKLOADS = ("sharegpt_long", "sharegpt_multiturn")
LONG_PERCENTILE = 90.0  # sharegpt_long keeps rows whose input + output is at or above this
_SPLIT_SUFFIX = re.compile(r"^(.*)_(\d+)$")


class PairColumns(NamedTuple):
    """The ShareGPT pairs as columns, in file order (read-only arrays)."""

    conversation: np.ndarray  # int code of the record id without its split suffix
    part: np.ndarray  # the split suffix (first message index of the record), 0 without one
    turn: np.ndarray
    prompt: np.ndarray
    history: np.ndarray
    response: np.ndarray


@lru_cache(maxsize=4)
def pair_columns(path: Path) -> PairColumns:
    """Parse the pairs file once per process (ids, turns and token counts; no text kept)."""
    codes: dict[str, int] = {}
    cols: list[list[int]] = [[], [], [], [], [], []]
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            m = _SPLIT_SUFFIX.match(row["id"])
            base, part = (m.group(1), int(m.group(2))) if m else (row["id"], 0)
            values = (
                codes.setdefault(base, len(codes)),
                part,
                row["turn"],
                row["prompt_tokens"],
                row["history_tokens"],
                row["response_tokens"],
            )
            for col, v in zip(cols, values, strict=True):
                col.append(v)
    arrays = [np.asarray(c, dtype=np.int64) for c in cols]
    for a in arrays:
        a.flags.writeable = False
    return PairColumns(*arrays)


def long_lengths(
    cols: PairColumns, max_context: int, percentile: float = LONG_PERCENTILE
) -> tuple[np.ndarray, np.ndarray, float]:
    """(inputs, outputs, threshold) of the rows whose capped input + output >= the percentile."""
    inp, out = _capped(cols.history + cols.prompt, cols.response, max_context)
    total = inp + out
    threshold = float(np.percentile(total, percentile))
    keep = total >= threshold
    return inp[keep], out[keep], threshold


def multiturn_lengths(cols: PairColumns, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, outputs) of every pair after the first of its conversation, history included."""
    order = np.lexsort((cols.turn, cols.part, cols.conversation))
    conv = cols.conversation[order]
    pair = (cols.prompt + cols.response)[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = conv[1:] != conv[:-1]
    done = np.cumsum(pair) - pair  # tokens of every earlier row in file-sorted order
    start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    history = done - done[start]  # only the earlier rows of the same conversation
    later = ~first
    inp = history[later] + cols.prompt[order][later]
    return _capped(inp, cols.response[order][later], max_context)


def _capped(inp: np.ndarray, out: np.ndarray, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    valid = (inp > 0) & (out > 0)
    rows = zip(inp[valid].tolist(), out[valid].tolist(), strict=True)
    pairs = [cap_lengths(p, o, max_context) for p, o in rows]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    capped = np.asarray(pairs, dtype=np.int64)
    return capped[:, 0], capped[:, 1]


def long_workload_samples(
    name: str, path: Path, n: int, rng: np.random.Generator, max_context: int
) -> tuple[list[LengthSample], str]:
    """n seeded (input, output) samples of a long workload (without replacement while the pool
    lasts) and a string saying what they are."""
    cols = pair_columns(path)
    if name == "sharegpt_long":
        inp, out, threshold = long_lengths(cols, max_context)
        what = (
            f"sharegpt_long ({path}: history+prompt input; input + output >= "
            f"p{LONG_PERCENTILE:g} = {threshold:.0f} tokens, {len(inp)} rows)"
        )
    elif name == "sharegpt_multiturn":
        inp, out = multiturn_lengths(cols, max_context)
        what = (
            f"sharegpt_multiturn ({path}: later turns, input = earlier turns' prompts and "
            f"responses + own prompt, capped at {max_context}; {len(inp)} rows)"
        )
    else:
        raise ValueError(f"unknown long workload {name!r}; choose from {LONG_WORKLOADS}")
    rows = rng.choice(len(inp), size=n, replace=n > len(inp))
    return [LengthSample(int(inp[i]), int(out[i])) for i in rows.tolist()], what


__all__ = [
    "LONG_PERCENTILE",
    "LONG_WORKLOADS",
    "PairColumns",
    "long_lengths",
    "long_workload_samples",
    "multiturn_lengths",
    "pair_columns",
]
