"""Run a Hugging Face Llama-family causal LM over a paged KV cache the scheduler assigns.

The scheduler owns the KV ledger: every step it names, per sequence, which token ids to run, the
position they start at and the block table (physical blocks, in logical order). This module only
executes: it reuses the HF model's own weights and modules (embeddings, projections, rotary
embedding, MLP, norms, lm_head) but replaces HF's attention and cache with one over a
``[num_blocks, block_size, kv_heads, head_dim]`` pool per layer, so any block can hold any
sequence's tokens and a sequence can be moved or recomputed without the worker keeping state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# Architectures whose decoder layers have the Llama shape (pre-norm, q/k/v/o, rotary, gated MLP).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# One sequence of a step: (request_id, token_ids, start_pos, block_table).
SeqInput = tuple[str, Sequence[int], int, Sequence[int]]


@dataclass
class _SeqView:
    """One sequence inside a flattened step: its token span and the pool slots it attends to."""

    offset: int  # first of its tokens in the flattened batch
    n: int  # tokens it runs this step
    read_slots: torch.Tensor  # pool slots of positions [0, start_pos + n)
    q_pos: torch.Tensor  # [n, 1] absolute positions of its new tokens


@dataclass
class _Batch:
    ids: torch.Tensor  # [T] token ids of all sequences, concatenated
    positions: torch.Tensor  # [T] absolute positions
    write_slots: torch.Tensor  # [T] pool slots the new K/V go to
    parts: list[_SeqView]


class ModelRunner:
    """Holds the model weights and the paged KV pool; ``step`` runs one scheduler iteration."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        num_blocks: int = 256,
        block_size: int = 16,
    ) -> None:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {str(path)!r} has no config.json (not a HF checkpoint)"
            )
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture {config.model_type!r} in {str(path)!r}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except OSError as exc:  # missing or unreadable weight files
            raise ValueError(f"cannot load weights from {str(path)!r}: {exc}") from exc
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.windows = [self._layer_window(i) for i in range(config.num_hidden_layers)]
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.windows]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.windows]

    def _layer_window(self, layer: int) -> int | None:
        """Sliding-window size for a layer, None for full attention (mirrors the HF models)."""
        cfg = self.config
        if cfg.model_type == "mistral":
            return getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types and layer_types[layer] == "sliding_attention":
            return cfg.sliding_window
        return None

    def _slots(self, block_table: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Flat pool slots (block * block_size + offset) of positions [start, end)."""
        needed = -(-end // self.block_size)
        if len(block_table) < needed:
            raise ValueError(f"block table has {len(block_table)} blocks, positions need {needed}")
        table = torch.as_tensor(list(block_table[:needed]), dtype=torch.long, device=self.device)
        if bool(((table < 0) | (table >= self.num_blocks)).any()):
            raise ValueError(f"block table {list(block_table)} outside pool of {self.num_blocks}")
        pos = torch.arange(start, end, device=self.device)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _plan(self, seqs: Sequence[SeqInput]) -> _Batch:
        """Flatten a step's sequences into one token batch plus per-sequence cache views."""
        ids, positions, write, parts = [], [], [], []
        offset = 0
        for rid, tokens, start, table in seqs:
            n = len(tokens)
            if n == 0:
                raise ValueError(f"sequence {rid!r} has no tokens in this step")
            end = start + n
            ids.extend(tokens)
            positions.append(torch.arange(start, end, device=self.device))
            write.append(self._slots(table, start, end))
            parts.append(_SeqView(offset, n, self._slots(table, 0, end), positions[-1][:, None]))
            offset += n
        write_slots = torch.cat(write)
        if write_slots.unique().numel() != write_slots.numel():
            raise ValueError("two tokens in one step write the same KV slot")
        return _Batch(
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.cat(positions),
            write_slots,
            parts,
        )

    @torch.inference_mode()
    def step(self, seqs: Sequence[SeqInput]) -> list[torch.Tensor]:
        """Run one iteration over a mixed batch; return each sequence's last-position logits.

        Prefill chunks and single-token decodes go through the same path: all new tokens are
        flattened into one batch for the projections and MLP (where the compute is), and only
        attention is done per sequence, over its own pages.
        """
        if not seqs:
            return []
        batch = self._plan(seqs)
        base = self.model.model
        hidden = base.embed_tokens(batch.ids)[None]  # [1, T, hidden]
        cos, sin = base.rotary_emb(hidden, batch.positions[None])
        for li, layer in enumerate(base.layers):
            attn_out = self._attention(
                li, layer.self_attn, layer.input_layernorm(hidden), cos, sin, batch
            )
            hidden = hidden + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = base.norm(hidden)[0]
        last = torch.tensor([p.offset + p.n - 1 for p in batch.parts], device=self.device)
        return list(self.model.lm_head(hidden[last]).float())

    def _attention(self, li, attn, x, cos, sin, batch: _Batch) -> torch.Tensor:
        """Project and rotate, write new K/V into the pool, attend per sequence over its pages.

        All writes happen before any read, so a chunk attends to itself causally through the
        pool exactly as earlier chunks do.
        """
        n_tok = x.shape[1]
        q = attn.q_proj(x).view(1, n_tok, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, n_tok, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(n_tok, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k_flat = self.k_cache[li].view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.v_cache[li].view(-1, self.num_kv_heads, self.head_dim)
        k_flat[batch.write_slots] = k[0].transpose(0, 1).to(self.dtype)
        v_flat[batch.write_slots] = v.to(self.dtype)

        groups = self.num_heads // self.num_kv_heads
        window = self.windows[li]
        outs = []
        for p in batch.parts:
            qs = q[:, :, p.offset : p.offset + p.n]  # [1, H, n, D]
            ks = k_flat[p.read_slots].transpose(0, 1).repeat_interleave(groups, dim=0)[None]
            vs = v_flat[p.read_slots].transpose(0, 1).repeat_interleave(groups, dim=0)[None]
            k_pos = torch.arange(p.read_slots.numel(), device=self.device)[None]
            mask = k_pos <= p.q_pos
            if window is not None:
                mask &= k_pos > p.q_pos - window
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=attn.scaling)
            outs.append(out[0].transpose(0, 1).reshape(p.n, -1))
        return attn.o_proj(torch.cat(outs)[None])

    @torch.inference_mode()
    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (the scheduler moved a sequence).

        All sources are read before any destination is written, so pairs may overlap.
        """
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for cache in (*self.k_cache, *self.v_cache):
            cache[dst] = cache[src]


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> int:
    """Pick one token id from 1-D logits; temperature 0 is greedy (argmax).

    A per-request seeded ``generator`` makes a request's samples reproducible regardless of what
    else shares the batch. ``top_k <= 0`` and ``top_p >= 1`` disable those filters.
    """
    logits = logits.float()
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token crossing top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded for one request, so its sampling is reproducible."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def greedy(logits: Sequence[torch.Tensor]) -> list[int]:
    """Argmax token for each sequence's logits."""
    return [int(torch.argmax(row)) for row in logits]
