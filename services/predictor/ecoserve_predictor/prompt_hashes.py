"""Hashes of the normalised prompt texts an artifact was fit on, kept beside the model.

`evaluate` needs them to say exactly which prompts of any file the model never saw in training;
the training data itself does not ship (its terms are unclear, and it is large).

Format of `train_prompts.sha256`: the first 8 bytes of the SHA-256 of each distinct normalised
training prompt (`data.normalise`, UTF-8), big-endian, sorted, no separators. 8 bytes keep the
file at ~320 KB for 40k prompts; two different prompts share a prefix with odds ~n/2^64
(1e-15 here), so membership is exact in practice. The hashes cover the pairs the weights and
tokenizer were fit on, not the calibration pairs (those set one scalar, the p90 shift).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .data import normalise

HASH_FILE = "train_prompts.sha256"
HASH_BYTES = 8
NORMALISATION = "nfkc-casefold-collapse-whitespace"  # meta's name for data.normalise
_DTYPE = np.dtype(">u8")


def prompt_hashes(prompts: Iterable[str]) -> np.ndarray:
    """uint64 [N]: the truncated SHA-256 of each prompt's normalised text, in order."""
    digests = b"".join(hashlib.sha256(normalise(p).encode()).digest()[:HASH_BYTES] for p in prompts)
    return np.frombuffer(digests, dtype=_DTYPE).astype(np.uint64)


def write_hashes(out_dir: str | Path, prompts: Iterable[str]) -> dict[str, object]:
    """Write HASH_FILE for these training prompts; meta.json's `prompt_hashes` entry."""
    hashes = np.unique(prompt_hashes(prompts))  # sorted, distinct
    (Path(out_dir) / HASH_FILE).write_bytes(hashes.astype(_DTYPE).tobytes())
    return {
        "file": HASH_FILE,
        "count": int(len(hashes)),
        "bytes": HASH_BYTES,
        "normalisation": NORMALISATION,
        "covers": "fit pairs (not calibration or validation)",
    }


def load_hashes(artifact: str | Path) -> np.ndarray | None:
    """The artifact's sorted training-prompt hashes, or None when it has none (older ones)."""
    path = Path(artifact) / HASH_FILE
    if not path.is_file():
        return None
    return np.frombuffer(path.read_bytes(), dtype=_DTYPE).astype(np.uint64)


def seen_in_training(prompts: Iterable[str], hashes: np.ndarray) -> np.ndarray:
    """bool [N]: whether each prompt's normalised text was among the training prompts."""
    query = prompt_hashes(prompts)
    if not len(hashes):
        return np.zeros(len(query), dtype=bool)
    at = np.searchsorted(hashes, query).clip(max=len(hashes) - 1)
    return hashes[at] == query
