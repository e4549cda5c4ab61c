"""The two candidate predictors (torch). Both map (ids, mask, features) to two numbers per
prompt, the log of the response length at quantiles 0.5 and 0.9, trained with the pinball loss.

- `BagModel`: mean of token embeddings plus the length features, then an MLP. Order-blind.
- `EncoderModel`: a 2-layer transformer encoder over the cut prompt, masked mean pool, same
  head. Written with plain ops (no fused kernels) so it exports to ONNX as is.

The 0.9 output is the 0.5 output plus a softplus, so the upper quantile is never below the
point estimate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .features import NUM_FEATURES

QUANTILES = (0.5, 0.9)
MASK_BIAS = -1e4  # finite: a row of padding only must not turn into NaN


class _Head(nn.Module):
    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim + NUM_FEATURES, hidden), nn.GELU(), nn.Linear(hidden, 2)
        )

    def forward(self, pooled: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        out = self.mlp(torch.cat([pooled, feats], dim=-1))
        median = out[:, :1] + 5.5  # log(256): start near the typical response
        return torch.cat([median, median + F.softplus(out[:, 1:])], dim=-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class BagModel(nn.Module):
    def __init__(self, vocab_size: int, max_len: int, dim: int = 96) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.head = _Head(dim)

    def forward(self, ids, mask, feats) -> torch.Tensor:
        return self.head(_masked_mean(self.embed(ids), mask), feats)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h) + bias  # [B, H, N, N]
        att = torch.softmax(scores, dim=-1) @ v  # [B, H, N, D/H]
        x = x + self.out(att.transpose(1, 2).reshape(b, n, d))
        return x + self.ff(self.norm2(x))


class EncoderModel(nn.Module):
    def __init__(
        self, vocab_size: int, max_len: int, dim: int = 128, layers: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, 2 * dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = _Head(dim)

    def forward(self, ids, mask, feats) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids) + self.pos(positions)[None]
        bias = ((1.0 - mask) * MASK_BIAS)[:, None, None, :]  # keys only
        for block in self.blocks:
            x = block(x, bias)
        return self.head(_masked_mean(self.norm(x), mask), feats)


MODELS = {"bag": BagModel, "encoder": EncoderModel}


def pinball_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean pinball loss over the QUANTILES columns of `pred` against `target` [B]."""
    q = torch.tensor(QUANTILES, device=pred.device)
    diff = target[:, None] - pred
    return torch.maximum(q * diff, (q - 1) * diff).mean()
