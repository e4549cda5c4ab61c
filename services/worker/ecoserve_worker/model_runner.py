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
    """A multi-token sequence (prefill chunk) inside a flattened step, attended on its own."""

    offset: int  # first of its tokens in the flattened batch
    n: int  # tokens it runs this step
    read_slots: torch.Tensor  # pool slots of positions [0, start_pos + n)
    masks: dict[int | None, torch.Tensor]  # per window: [n, start_pos + n] causal mask


@dataclass
class _Decode:
    """All single-token rows of a step, attended together in one padded call per layer."""

    rows: torch.Tensor | None  # [B] their token indices, None when they are the whole batch
    slots: torch.Tensor  # [B, max_ctx] pool slots of their contexts (padding: slot 0, masked)
    masks: dict[int | None, torch.Tensor]  # per window: [B, 1, 1, max_ctx] bool


@dataclass
class _Batch:
    ids: torch.Tensor  # [T] token ids of all sequences, concatenated
    positions: torch.Tensor  # [T] absolute positions
    write_slots: torch.Tensor  # [T] pool slots the new K/V go to
    parts: list[_SeqView]
    decode: _Decode | None
    last: torch.Tensor | None  # [S] each sequence's last token, None when that is every token


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

    def _table(self, block_table: Sequence[int], end: int) -> list[int]:
        """The blocks holding positions [0, end), checked against the pool (plain Python)."""
        needed = -(-end // self.block_size)
        if len(block_table) < needed:
            raise ValueError(f"block table has {len(block_table)} blocks, positions need {needed}")
        table = [int(b) for b in block_table[:needed]]
        if table and (min(table) < 0 or max(table) >= self.num_blocks):
            raise ValueError(f"block table {list(block_table)} outside pool of {self.num_blocks}")
        return table

    def _plan(self, seqs: Sequence[SeqInput]) -> _Batch:
        """Flatten a step's sequences into one token batch plus the views attention reads.

        Everything is validated on Python lists first; then each tensor is built once per step,
        so the per-layer path does no per-sequence Python for decode rows.
        """
        bs = self.block_size
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        write: list[int] = []
        last: list[int] = []
        prefills: list[tuple[int, int, int, list[int]]] = []  # offset, n, start, table
        dec_rows: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        offset = 0
        for rid, tokens, start, block_table in seqs:
            n = len(tokens)
            if n == 0:
                raise ValueError(f"sequence {rid!r} has no tokens in this step")
            end = start + n
            table = self._table(block_table, end)
            ids.extend(tokens)
            positions.extend(range(start, end))
            write.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if n == 1:
                dec_rows.append(offset)
                dec_tables.append(table)
                dec_lens.append(end)
            else:
                prefills.append((offset, n, start, table))
            offset += n
            last.append(offset - 1)
        if len(set(write)) != len(write):
            raise ValueError("two tokens in one step write the same KV slot")
        windows = set(self.windows)

        parts = []
        for off, n, start, table in prefills:
            end = start + n
            pos = torch.arange(end, device=dev)
            tbl = torch.tensor(table, dtype=torch.long, device=dev)
            read_slots = tbl[pos // bs] * bs + pos % bs
            q_pos = pos[start:, None]
            causal = pos[None] <= q_pos
            masks = {w: causal if w is None else causal & (pos[None] > q_pos - w) for w in windows}
            parts.append(_SeqView(off, n, read_slots, masks))

        decode = None
        if dec_rows:
            width = max(len(t) for t in dec_tables)
            padded = [t + [0] * (width - len(t)) for t in dec_tables]
            tbl = torch.tensor(padded, dtype=torch.long, device=dev)  # [B, width]
            ctx = torch.arange(width * bs, device=dev)  # [C]
            slots = tbl[:, ctx // bs] * bs + ctx % bs  # [B, C]
            lens = torch.tensor(dec_lens, dtype=torch.long, device=dev)[:, None]  # [B, 1]
            valid = ctx[None] < lens
            masks = {}
            for w in windows:
                m = valid if w is None else valid & (ctx[None] >= lens - w)
                masks[w] = m[:, None, None, :]
            rows = None
            if prefills:
                rows = torch.tensor(dec_rows, dtype=torch.long, device=dev)
            decode = _Decode(rows, slots, masks)

        return _Batch(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            torch.tensor(write, dtype=torch.long, device=dev),
            parts,
            decode,
            None if offset == len(seqs) else torch.tensor(last, dtype=torch.long, device=dev),
        )

    @torch.inference_mode()
    def step(self, seqs: Sequence[SeqInput]) -> list[torch.Tensor]:
        """Run one iteration over a mixed batch; return each sequence's last-position logits.

        Prefill chunks and single-token decodes share the projections and MLP (all new tokens
        are flattened into one batch, where the compute is). Attention runs all decode rows in
        one padded call per layer and each prefill chunk on its own, over its pages.
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
        if batch.last is not None:
            hidden = hidden[batch.last]
        return list(self.model.lm_head(hidden).float().unbind(0))

    def _attention(self, li, attn, x, cos, sin, batch: _Batch) -> torch.Tensor:
        """Project and rotate, write new K/V into the pool, attend over each sequence's pages.

        All writes happen before any read, so a chunk attends to itself causally through the
        pool exactly as earlier chunks do.
        """
        n_tok = x.shape[1]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = attn.q_proj(x).view(1, n_tok, h, d)
        k = attn.k_proj(x).view(1, n_tok, kvh, d)
        v = attn.v_proj(x).view(n_tok, kvh, d)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        q = q[0]  # [T, H, D]
        k_flat = self.k_cache[li].view(-1, kvh, d)
        v_flat = self.v_cache[li].view(-1, kvh, d)
        k_flat.index_copy_(0, batch.write_slots, k[0].to(self.dtype))
        v_flat.index_copy_(0, batch.write_slots, v.to(self.dtype))

        groups = h // kvh
        window = self.windows[li]
        dec = batch.decode
        if dec is not None and not batch.parts:  # pure decode step: one call, no scatter
            return attn.o_proj(self._decode_attention(attn, q, k_flat, v_flat, dec, window)[None])

        out = q.new_empty(n_tok, h * d)
        if dec is not None:
            qd = q.index_select(0, dec.rows)
            out[dec.rows] = self._decode_attention(attn, qd, k_flat, v_flat, dec, window)
        for p in batch.parts:
            qs = q[p.offset : p.offset + p.n].transpose(0, 1)[None]  # [1, H, n, D]
            ks = k_flat[p.read_slots].transpose(0, 1).repeat_interleave(groups, dim=0)[None]
            vs = v_flat[p.read_slots].transpose(0, 1).repeat_interleave(groups, dim=0)[None]
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=p.masks[window], scale=attn.scaling
            )
            out[p.offset : p.offset + p.n] = o[0].transpose(0, 1).reshape(p.n, -1)
        return attn.o_proj(out[None])

    def _decode_attention(self, attn, q, k_flat, v_flat, dec: _Decode, window: int | None):
        """One SDPA call for all single-token rows: q [B, H, D] -> [B, H * D].

        The query heads sharing a KV head ride in SDPA's query-length dimension
        ([B, KVH, groups, D] against [B, KVH, C, D]), so K/V are never repeated; the mask
        covers keys only, so each of those "queries" sees exactly its row's context.
        """
        b = q.shape[0]
        kvh = self.num_kv_heads
        qg = q.reshape(b, kvh, self.num_heads // kvh, self.head_dim)
        ks = k_flat[dec.slots].transpose(1, 2)  # [B, KVH, C, D]
        vs = v_flat[dec.slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qg, ks, vs, attn_mask=dec.masks[window], scale=attn.scaling
        )
        return o.reshape(b, -1)

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
    if not len(logits):
        return []
    return torch.stack(list(logits)).argmax(-1).tolist()
