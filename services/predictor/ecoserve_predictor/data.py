"""Prompt / response-length pairs: the ShareGPT file in ../shared/data, or a synthetic stand-in.

The split is by conversation: a ShareGPT record id is `<conversation>_<part>`, and every turn of
one conversation lands on the same side (a hash of the conversation id), so validation never
sees a conversation it trained on. The same prompt text also recurs across conversations
("continue", pasted instructions), and a model scores far better on a prompt it trained on, so
`honest_split` then moves each pair to the first side that holds its normalised prompt text:
no normalised prompt is on two sides.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import unicodedata
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path(os.environ.get("ECOSERVE_DATA_DIR", "../shared/data"))
SHAREGPT_FILE = "sharegpt_v3_pairs.jsonl.gz"
VAL_PERCENT = 10  # `split`'s default: the held-out share of conversations
# honest_split: test is the old validation rule (the packaged artifact never saw a test
# conversation); validation is a salted share of the rest.
TEST_PERCENT = 10
HONEST_VAL_PERCENT = 5


@dataclass(frozen=True)
class Pair:
    group: str  # conversation id: the unit of the split
    prompt: str
    response_tokens: int
    prompt_tokens: int = 0  # as the data gives it (cl100k for ShareGPT); baselines use it
    record: str = ""  # ShareGPT record id (`<conversation>_<part>`): evaluate's history unit
    turn: int = 0  # index of the prompt's message within the record (0: it opens the record)


def conversation_of(record_id: str) -> str:
    return record_id.rsplit("_", 1)[0]


def load_sharegpt(data_dir: str | Path = DEFAULT_DATA_DIR) -> list[Pair]:
    """All pairs of the ShareGPT file; FileNotFoundError (with the path) when it is absent."""
    path = Path(data_dir) / SHAREGPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"ShareGPT pairs not found at {path} (set --data-dir)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = (json.loads(line) for line in f)
        return [
            Pair(
                conversation_of(r["id"]),
                r["prompt"],
                int(r["response_tokens"]),
                int(r["prompt_tokens"]),
                r["id"],
                int(r["turn"]),
            )
            for r in rows
        ]


def is_validation(group: str, percent: int = VAL_PERCENT, salt: str = "") -> bool:
    return zlib.crc32(f"{salt}{group}".encode()) % 100 < percent


def split(
    pairs: list[Pair], percent: int = VAL_PERCENT, salt: str = ""
) -> tuple[list[Pair], list[Pair]]:
    """(train, held out), by a hash of the conversation id; another `salt` gives a split
    independent of the first (used to carve a calibration set out of the training side)."""
    train, val = [], []
    for p in pairs:
        (val if is_validation(p.group, percent, salt) else train).append(p)
    return train, val


def normalise(prompt: str) -> str:
    """The prompt text two copies of one prompt share: NFKC (full-width and compatibility
    forms fold), casefolded, whitespace runs collapsed to one space and the ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", prompt).casefold().split())


def dedup(sides: Sequence[Sequence[Pair]]) -> list[list[Pair]]:
    """Each pair moved to the first side (in the order given) whose pairs share its normalised
    prompt text, so no normalised prompt is on two sides. Nothing is dropped: a repeated prompt
    still trains, it just never counts as held out."""
    first: dict[str, int] = {}
    for i, side in enumerate(sides):
        for p in side:
            first.setdefault(normalise(p.prompt), i)
    out: list[list[Pair]] = [[] for _ in sides]
    for side in sides:
        for p in side:
            out[first[normalise(p.prompt)]].append(p)
    return out


def honest_split(pairs: list[Pair]) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(train, validation, test): by conversation, then deduplicated by normalised prompt with
    training first. Test holds the conversations `split` held out (TEST_PERCENT), so the
    packaged artifact, trained under `split`, never saw one of them."""
    sides: list[list[Pair]] = [[], [], []]
    for p in pairs:
        sides[conversation_side(p.group)].append(p)
    train, val, test = dedup(sides)
    return train, val, test


def conversation_side(group: str) -> int:
    """Where `honest_split` puts a conversation before the dedup: 0 train, 1 validation (of
    the rest, HONEST_VAL_PERCENT), 2 test (TEST_PERCENT)."""
    if is_validation(group, TEST_PERCENT):
        return 2
    return 1 if is_validation(group, HONEST_VAL_PERCENT, salt="validation") else 0


# Synthetic prompts whose response length depends on what they ask (so a model that reads the
# text can learn it, and one that counts prompt tokens cannot): for tests and data-less runs.
_ASKS = {
    "translate": 40,
    "summarize": 120,
    "list": 200,
    "explain": 320,
    "write an essay about": 600,
}
_TOPICS = ["the river", "a scheduler", "tax law", "the moon", "sourdough bread", "GPU memory"]


def synthetic_pairs(n: int, seed: int = 0) -> list[Pair]:
    rng = random.Random(seed)
    asks = list(_ASKS)
    out = []
    for i in range(n):
        ask = rng.choice(asks)
        filler = " ".join(rng.choice(_TOPICS) for _ in range(rng.randint(0, 12)))
        prompt = f"Please {ask} {rng.choice(_TOPICS)}. {filler}".strip()
        length = max(1, int(_ASKS[ask] * rng.lognormvariate(0, 0.3)))
        group = f"syn{i // 3}"  # three turns a conversation
        out.append(Pair(group, prompt, length, len(prompt.split()), group, i % 3))
    return out
