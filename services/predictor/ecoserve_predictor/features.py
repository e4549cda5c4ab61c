"""Text -> model inputs, shared by training (torch) and serving (ONNX Runtime): no torch here.

A prompt becomes token ids from our own byte-level BPE (trained on the training prompts), cut
to its first `head` and last `tail` tokens (an instruction tends to sit at one end of a long
prompt), padded to the longest prompt of the batch, plus three numeric features the text cut
would lose: log of the token count, of the character count, and of the line count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_ID = 0
NUM_FEATURES = 3
TRAIN_CHARS = 4000  # of each prompt, when training the tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>"],  # id 0 == PAD_ID
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t[:TRAIN_CHARS] for t in texts), trainer)
    return tok


@dataclass(frozen=True)
class Encoder:
    """Tokenizer + cut lengths: turns a batch of prompts into (ids, mask, features)."""

    tokenizer: Tokenizer
    head: int = 96
    tail: int = 32

    @property
    def max_len(self) -> int:
        return self.head + self.tail

    @classmethod
    def load(cls, path: str | Path, head: int = 96, tail: int = 32) -> Encoder:
        return cls(Tokenizer.from_file(str(path)), head, tail)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids int64 [B, L], mask float32 [B, L], features float32 [B, NUM_FEATURES];
        L is the longest cut prompt of the batch (at least 1)."""
        cut, feats = self.tokenize(texts)
        ids, mask = pad(cut)
        return ids, mask, feats

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Cut token ids per prompt, and the features of the whole prompts."""
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        feats = np.array(
            [
                (math.log1p(len(e.ids)), math.log1p(len(t)), math.log1p(t.count("\n")))
                for e, t in zip(encs, texts, strict=True)
            ],
            dtype=np.float32,
        ).reshape(len(encs), NUM_FEATURES)
        return [self._cut(e.ids) for e in encs], feats

    def _cut(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_len:
            return ids
        return ids[: self.head] + ids[len(ids) - self.tail :]


def pad(cut: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest (at least 1): ids int64 [B, L] and mask float32 [B, L]."""
    width = max(1, max((len(c) for c in cut), default=1))
    ids = np.full((len(cut), width), PAD_ID, dtype=np.int64)
    for i, c in enumerate(cut):
        ids[i, : len(c)] = c
    return ids, (ids != PAD_ID).astype(np.float32)


def bucket_of(lengths: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """Bucket id per length: i such that edges[i-1] <= length < edges[i] (0 below edges[0])."""
    return np.searchsorted(np.asarray(edges), np.asarray(lengths), side="right")
