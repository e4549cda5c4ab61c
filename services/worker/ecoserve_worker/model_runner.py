"""Run a Hugging Face Llama-family causal LM over a paged KV cache the scheduler assigns.

The scheduler owns the KV ledger: every step it names, per sequence, which token ids to run, the
position they start at and the block table (physical blocks, in logical order). This module only
executes. It loads the HF model and keeps its weights (embeddings, norms, lm_head, rotary
embedding), but runs the decoder layers itself: q/k/v and gate/up are fused into one matmul each
(the HF modules' weights become views of the fused tensors, so memory is not doubled), and
attention reads and writes a ``[num_blocks, block_size, 2, kv_heads, head_dim]`` pool per layer
(K and V side by side, so one gather serves both). Any block can hold any sequence's tokens, and
a sequence can be moved or recomputed without the worker keeping state.

Why not HF's own forward: the model is tiny next to the Python around it, so per-layer calls are
what a step costs; this path makes ~8 kernel calls per layer where HF's makes ~40.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

# Architectures whose decoder layers have the Llama shape (pre-norm, q/k/v/o, rotary, gated MLP).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# One sequence of a step: (request_id, token_ids, start_pos, block_table).
SeqInput = tuple[str, Sequence[int], int, Sequence[int]]


class _Proj:
    """One projection, y = x W^T + b. On CPU in fp32 the weight is also kept prepacked in
    oneDNN's blocked layout (the layout torch.compile's CPU backend uses): measured on 2 cores,
    1 thread, a 5-row x [2048, 256] projection took 87 us against 171 us through F.linear, and
    decode steps are mostly such small projections. That copy costs the layers' weight memory
    once more, so it is only made where the model is small enough to serve from a CPU."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, prepack: bool) -> None:
        self.weight, self.bias, self.packed = weight, bias, None
        if prepack:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


PACK_ROWS_HINT = 16  # oneDNN picks its blocking for about this many rows; any count runs


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether _Proj can use oneDNN's prepacked fp32 weights here."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


@dataclass
class _Layer:
    """One decoder layer's weights, fused where HF keeps them apart."""

    in_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: _Proj  # [(H + 2 * KVH) * D, hidden]: q, then k, then v rows
    o_proj: _Proj
    gate_up: _Proj  # [2 * I, hidden]: gate rows, then up rows
    down: _Proj
    act: Callable[[torch.Tensor], torch.Tensor]
    window: int | None  # sliding window, None for full attention
    scaling: float


@dataclass
class _Prefill:
    """Prefill chunks of a step that are attended together.

    A group of fresh prompts (start_pos 0) of one length attends to its own new K/V directly;
    a chunk that continues a sequence reads its earlier K/V from the pool (a group of one)."""

    offsets: list[int]  # first token of each chunk in the flattened batch
    n: int  # tokens per chunk
    read_slots: torch.Tensor | None  # [start + n] pool slots, None for fresh prompts
    mask: dict[int | None, torch.Tensor | None]  # per window: [n, ctx] bool, None = causal


@dataclass
class _DecodeGroup:
    """Decode rows of similar context length, attended in one padded call per layer."""

    rows: slice | torch.Tensor  # their places among the step's decode rows
    blocks: torch.Tensor  # [n * W] their block tables, padded with block 0 (masked out)
    batch: int  # n
    width: int  # W, in blocks
    masks: dict[int | None, torch.Tensor]  # per window: [n, 1, 1, W * block_size], 0 or -inf


@dataclass
class _Decode:
    """All single-token rows of a step, attended in a few padded calls per layer."""

    rows: slice | torch.Tensor  # their token indices: a slice when they lead the batch
    batch: int
    groups: list[_DecodeGroup]


@dataclass
class _Batch:
    ids: torch.Tensor  # [T] token ids of all sequences, concatenated
    positions: torch.Tensor  # [T] absolute positions
    write_slots: torch.Tensor  # [T] pool slots the new K/V go to
    prefills: list[_Prefill]
    decode: _Decode | None
    last: torch.Tensor | None  # [S] each sequence's last token, None when that is every token


def _fuse(modules: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate Linear weights (and biases, zeros where one has none); re-point each module
    at its slice of the result, so the old tensors are freed and HF's forward still works."""
    weight = torch.cat([m.weight.detach() for m in modules]).contiguous()
    has_bias = any(m.bias is not None for m in modules)
    bias = None
    if has_bias:
        bias = torch.cat(
            [
                m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                for m in modules
            ]
        )
    row = 0
    for m in modules:
        n = m.out_features
        m.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n
    return weight, bias


def _longs(values: Iterable[int], device: torch.device) -> torch.Tensor:
    """A 1-D int64 tensor from Python ints (a typed buffer: ~5x faster than torch.tensor)."""
    buf = array.array("q", values)
    if not buf:
        return torch.empty(0, dtype=torch.long, device=device)
    t = torch.frombuffer(buf, dtype=torch.long)
    return t if device.type == "cpu" else t.to(device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# A separate attention call per layer costs about what this many padded context blocks do
# (measured on CPU: ~4 small ops per call against ~1 us per context token per step).
GROUP_OVERHEAD_BLOCKS = 16


def group_by_width(widths: Sequence[int], overhead: int) -> list[list[int]]:
    """Split rows into groups padded to their widest row, wasting little on padding.

    Rows are sorted by width and cut where the power-of-two size class changes (so padding
    at most doubles a row); then neighbouring groups are merged, cheapest first, while a merge
    pads fewer than `overhead` blocks in all (a call per group costs that much). One group,
    in the original order, when the widths are alike: the common case pays nothing.
    """
    order = sorted(range(len(widths)), key=widths.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        if groups and widths[i].bit_length() == widths[groups[-1][-1]].bit_length():
            groups[-1].append(i)
        else:
            groups.append([i])
    while len(groups) > 1:
        cost = [len(a) * (widths[b[-1]] - widths[a[-1]]) for a, b in itertools.pairwise(groups)]
        k = min(range(len(cost)), key=cost.__getitem__)
        if cost[k] >= overhead:
            break
        groups[k : k + 2] = [groups[k] + groups[k + 1]]
    if len(groups) == 1:
        return [list(range(len(widths)))]
    return groups


class ModelRunner:
    """Holds the model weights and the paged KV pool; ``step`` runs one scheduler iteration."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        num_blocks: int = 256,
        block_size: int = 16,
        prepack: bool | None = None,
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
        self.model = model.to(device).eval().requires_grad_(False)
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        base = self.model.model
        # None: prepack where it can (CPU, fp32) and the decoder weights are under 2 GiB.
        layer_bytes = sum(p.numel() for p in base.layers.parameters()) * 4
        if prepack is None:
            prepack = can_prepack(self.device, dtype) and layer_bytes < 2**31
        self.prepack = prepack
        self.layers = [self._fuse_layer(i, layer) for i, layer in enumerate(base.layers)]
        self.windows = [layer.window for layer in self.layers]
        self.norm_eps = _eps(base.norm)
        shape = (num_blocks, block_size, 2, self.num_kv_heads, self.head_dim)
        # kv_cache[layer][block, offset, 0] is K, [..., 1] is V.
        self.kv_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers]
        # cos/sin per position, grown on demand; HF's "dynamic" rope changes with length, so it
        # is computed per step instead.
        self._rope_static = "dynamic" not in str(getattr(base.rotary_emb, "rope_type", ""))
        self._cos = self._sin = torch.empty(0, self.head_dim, dtype=dtype, device=self.device)
        self._scratch = torch.empty(0, dtype=dtype, device=self.device)

    def _fuse_layer(self, index: int, layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up, gate_up_bias = _fuse([mlp.gate_proj, mlp.up_proj])
        pack = self.prepack
        return _Layer(
            layer.input_layernorm.weight,
            layer.post_attention_layernorm.weight,
            _eps(layer.input_layernorm),
            _Proj(qkv, qkv_bias, pack),
            _Proj(attn.o_proj.weight, attn.o_proj.bias, pack),
            _Proj(gate_up, gate_up_bias, pack),
            _Proj(mlp.down_proj.weight, mlp.down_proj.bias, pack),
            F.silu if isinstance(mlp.act_fn, nn.SiLU) else mlp.act_fn,
            self._layer_window(index),
            float(attn.scaling),
        )

    def _layer_window(self, layer: int) -> int | None:
        """Sliding-window size for a layer, None for full attention (mirrors the HF models)."""
        cfg = self.config
        if cfg.model_type == "mistral":
            return getattr(cfg, "sliding_window", None)
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types and layer_types[layer] == "sliding_attention":
            return cfg.sliding_window
        return None

    # ---- step inputs -----------------------------------------------------------------------

    def _check_table(self, rid: str, table: Sequence[int], end: int) -> Sequence[int]:
        """The blocks holding positions [0, end), checked against the pool."""
        needed = (end - 1) // self.block_size + 1
        if len(table) < needed:
            raise ValueError(f"block table has {len(table)} blocks, positions need {needed}")
        table = table[:needed]
        if min(table) < 0 or max(table) >= self.num_blocks:
            raise ValueError(
                f"block table {list(table)} of {rid!r} outside pool of {self.num_blocks}"
            )
        return table

    def _plan(self, seqs: Sequence[SeqInput]) -> _Batch:
        """Flatten a step's sequences into one token batch plus the views attention reads.

        Everything is validated on Python lists; then each tensor is built once per step, so
        the per-layer path does no per-sequence Python for decode rows.
        """
        if all(len(s[1]) == 1 for s in seqs):
            return self._plan_decodes(seqs)
        bs = self.block_size
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        write: list[int] = []
        last: list[int] = []
        fresh: dict[int, list[int]] = {}  # length -> offsets of fresh prompts
        chunks: list[tuple[int, int, int, Sequence[int]]] = []  # offset, n, start, table
        dec_rows: list[int] = []
        dec_tables: list[Sequence[int]] = []
        dec_pos: list[int] = []
        offset = 0
        for rid, tokens, start, block_table in seqs:
            n = len(tokens)
            if n == 0:
                raise ValueError(f"sequence {rid!r} has no tokens in this step")
            end = start + n
            table = self._check_table(rid, block_table, end)
            ids.extend(tokens)
            positions.extend(range(start, end))
            write.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if n == 1:
                dec_rows.append(offset)
                dec_tables.append(table)
                dec_pos.append(start)
            elif start == 0:
                fresh.setdefault(n, []).append(offset)
            else:
                chunks.append((offset, n, start, table))
            offset += n
            last.append(offset - 1)
        if len(set(write)) != len(write):
            raise ValueError("two tokens in one step write the same KV slot")
        windows = set(self.windows)

        prefills = [
            _Prefill(offs, n, None, {w: self._fresh_mask(n, w) for w in windows})
            for n, offs in fresh.items()
        ]
        for off, n, start, table in chunks:
            end = start + n
            pos = torch.arange(end, device=dev)
            tbl = _longs(table, dev)
            read_slots = (tbl[:, None] * bs + torch.arange(bs, device=dev)).view(-1)[:end]
            q_pos = pos[start:, None]
            causal = pos[None] <= q_pos
            masks = {w: causal if w is None else causal & (pos[None] > q_pos - w) for w in windows}
            prefills.append(_Prefill([off], n, read_slots, masks))

        decode = None
        if dec_rows:
            rows: slice | torch.Tensor = slice(0, len(dec_rows))
            if dec_rows[-1] != len(dec_rows) - 1:  # not the leading rows of the batch
                rows = _longs(dec_rows, dev)
            decode = self._decode_view(rows, dec_tables, dec_pos)

        return _Batch(
            _longs(ids, dev),
            _longs(positions, dev),
            _longs(write, dev),
            prefills,
            decode,
            _longs(last, dev),
        )

    def _plan_decodes(self, seqs: Sequence[SeqInput]) -> _Batch:
        """The hot path: every sequence feeds one token. Same checks, column-wise."""
        bs = self.block_size
        dev = self.device
        _, tokens, starts, tables = zip(*seqs, strict=True)
        blocks = [p // bs for p in starts]
        if any(i >= len(t) for i, t in zip(blocks, tables, strict=True)):
            rid, _, p, t = next(s for s in seqs if s[2] // bs >= len(s[3]))
            raise ValueError(f"block table has {len(t)} blocks, positions need {p // bs + 1}")
        if min(map(min, tables)) < 0 or max(map(max, tables)) >= self.num_blocks:
            bad = next(s for s in seqs if min(s[3]) < 0 or max(s[3]) >= self.num_blocks)
            raise ValueError(
                f"block table {list(bad[3])} of {bad[0]!r} outside pool of {self.num_blocks}"
            )
        write = [t[i] * bs + p % bs for t, i, p in zip(tables, blocks, starts, strict=True)]
        if len(set(write)) != len(write):
            raise ValueError("two tokens in one step write the same KV slot")
        return _Batch(
            _longs([t[0] for t in tokens], dev),
            _longs(starts, dev),
            _longs(write, dev),
            [],
            self._decode_view(slice(0, len(seqs)), tables, starts),
            None,
        )

    def _decode_view(self, rows, tables: Sequence[Sequence[int]], starts) -> _Decode:
        """Block tables and masks of single-token rows at positions ``starts``, grouped by
        context length. A table may run past its position (blocks reserved for later
        tokens): only the blocks up to the position are read."""
        bs = self.block_size
        widths = [p // bs + 1 for p in starts]
        groups = [
            self._decode_group(idx, [tables[i] for i in idx], [starts[i] for i in idx], widths)
            for idx in group_by_width(widths, GROUP_OVERHEAD_BLOCKS)
        ]
        return _Decode(rows, len(tables), groups)

    def _decode_group(self, idx: list[int], tables, starts, widths) -> _DecodeGroup:
        dev = self.device
        width = max(widths[i] for i in idx)
        flat = [b for t in tables for b in (*t[:width], *(0,) * (width - len(t)))]
        ctx = torch.arange(width * self.block_size, device=dev)  # [C]
        pos = _longs(starts, dev)[:, None]  # [n, 1]
        valid = ctx[None] <= pos
        masks = {}
        for w in set(self.windows):  # additive masks: SDPA's CPU kernel is ~2x faster than bool
            m = valid if w is None else valid & (ctx[None] > pos - w)
            bias = torch.zeros(m.shape, dtype=self.dtype, device=dev)
            masks[w] = bias.masked_fill_(~m, float("-inf"))[:, None, None, :]
        in_order = idx == list(range(idx[0], idx[0] + len(idx)))
        rows = slice(idx[0], idx[0] + len(idx)) if in_order else _longs(idx, dev)
        return _DecodeGroup(rows, _longs(flat, dev), len(idx), width, masks)

    def _buffer(self, numel: int) -> torch.Tensor:
        """A scratch tensor of at least `numel` elements, kept between steps. The decode
        gather is the largest temporary of a step (B x context x KV row); allocating it fresh
        each layer cost page faults worth ~5x the copy itself (measured, CPU)."""
        if self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self._scratch[:numel]

    def _fresh_mask(self, n: int, window: int | None) -> torch.Tensor | None:
        """Mask of a fresh n-token prompt: None (plain causal) unless a window cuts it."""
        if window is None or window >= n:
            return None
        pos = torch.arange(n, device=self.device)
        return (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - window)

    def _rope(self, positions: torch.Tensor, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each position, [T, 1, D] (HF's rotary embedding, cached)."""
        rotary = self.model.model.rotary_emb
        if not self._rope_static:
            cos, sin = rotary(self._cos, positions[None])
            return cos[0, :, None], sin[0, :, None]
        if max_pos >= self._cos.shape[0]:
            n = max(256, 2 * self._cos.shape[0], max_pos + 1)
            grid = torch.arange(n, device=self.device)[None]
            cos, sin = rotary(self._cos, grid)
            self._cos, self._sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        return self._cos[positions][:, None], self._sin[positions][:, None]

    # ---- forward ---------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, seqs: Sequence[SeqInput]) -> torch.Tensor:
        """Run one iteration over a mixed batch; return each sequence's last-position logits
        as one float tensor [len(seqs), vocab].

        Prefill chunks and single-token decodes share the projections and MLP (all new tokens
        are flattened into one batch, where the compute is). Attention runs all decode rows in
        one padded call per layer, fresh prompts of one length together, and each continued
        chunk on its own over its pages.
        """
        if not seqs:
            return torch.empty(0, self.config.vocab_size, device=self.device)
        batch = self._plan(seqs)
        base = self.model.model
        hidden = self.hidden_size
        x = base.embed_tokens(batch.ids)  # [T, hidden]
        max_pos = max(s[2] + len(s[1]) for s in seqs) - 1
        cos, sin = self._rope(batch.positions, max_pos)
        for li, layer in enumerate(self.layers):
            h = F.rms_norm(x, (hidden,), layer.in_norm, layer.eps)
            attn = self._attention(li, layer, h, cos, sin, batch)
            x = x + layer.o_proj(attn)
            h = F.rms_norm(x, (hidden,), layer.post_norm, layer.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(layer.act(gate) * up)
        if batch.last is not None:
            x = x.index_select(0, batch.last)
        x = F.rms_norm(x, (hidden,), base.norm.weight, self.norm_eps)
        return self.model.lm_head(x).float()

    def _attention(self, li, layer: _Layer, h, cos, sin, batch: _Batch) -> torch.Tensor:
        """Project and rotate, write new K/V into the pool, attend; returns [T, H * D].

        All writes happen before any read, so a chunk attends to itself causally through the
        pool exactly as earlier chunks do.
        """
        n_tok = h.shape[0]
        nh, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = layer.qkv(h).view(n_tok, nh + 2 * kvh, d)
        qk = qkv[:, : nh + kvh]
        rotated = _rotate_half(qk).mul_(sin).addcmul_(qk, cos)
        qk.copy_(rotated)  # q and k rotated in place, so k lands next to v for one write
        q = qkv[:, :nh]  # [T, H, D]
        new_kv = qkv[:, nh:].view(n_tok, 2, kvh, d)  # rotated k, then v
        pool = self.kv_cache[li].view(-1, 2, kvh, d)
        pool.index_copy_(0, batch.write_slots, new_kv)

        dec = batch.decode
        if dec is not None and not batch.prefills:  # pure decode step: one call, no scatter
            return self._decode_attention(layer, q, li, dec)
        out = q.new_empty(n_tok, nh * d)
        if dec is not None:
            rows = dec.rows
            qd = q[rows] if isinstance(rows, slice) else q.index_select(0, rows)
            out[rows] = self._decode_attention(layer, qd, li, dec)
        for p in batch.prefills:
            self._prefill_attention(layer, q, new_kv, pool, p, out)
        return out

    def _decode_attention(self, layer: _Layer, q, li: int, dec: _Decode) -> torch.Tensor:
        """Attend all single-token rows, q [B, H, D] -> [B, H * D]: one SDPA call per group.

        The query heads sharing a KV head ride in SDPA's query-length dimension
        ([n, KVH, groups, D] against [n, KVH, C, D]), so K/V are never repeated; the mask
        covers keys only, so each of those "queries" sees exactly its row's context.
        """
        if len(dec.groups) == 1:
            return self._attend_group(layer, q, li, dec.groups[0])
        out = q.new_empty(dec.batch, self.num_heads * self.head_dim)
        for g in dec.groups:
            qg = q[g.rows] if isinstance(g.rows, slice) else q.index_select(0, g.rows)
            o = self._attend_group(layer, qg, li, g)
            if isinstance(g.rows, slice):
                out[g.rows] = o
            else:
                out.index_copy_(0, g.rows, o)
        return out

    def _attend_group(self, layer: _Layer, q, li: int, g: _DecodeGroup) -> torch.Tensor:
        kvh, d, bs = self.num_kv_heads, self.head_dim, self.block_size
        cache = self.kv_cache[li]
        blocks = cache.view(self.num_blocks, -1)  # one row per block: gathered whole
        kv = self._buffer(g.blocks.numel() * blocks.shape[1]).view(-1, blocks.shape[1])
        torch.index_select(blocks, 0, g.blocks, out=kv)
        kv = kv.view(g.batch, g.width * bs, 2, kvh, d)
        o = F.scaled_dot_product_attention(
            q.reshape(g.batch, kvh, self.num_heads // kvh, d),
            kv[:, :, 0].transpose(1, 2),  # [n, KVH, C, D]
            kv[:, :, 1].transpose(1, 2),
            attn_mask=g.masks[layer.window],
            scale=layer.scaling,
        )
        return o.reshape(g.batch, -1)

    def _prefill_attention(self, layer: _Layer, q, new_kv, pool, p: _Prefill, out) -> None:
        """Attend a group of prefill chunks and write their rows of ``out``."""
        n, groups = p.n, self.num_heads // self.num_kv_heads
        if p.read_slots is None:  # fresh prompts: their K/V are this step's, in order
            kv = torch.stack([new_kv[o : o + n] for o in p.offsets])  # [P, n, 2, KVH, D]
        else:
            kv = pool.index_select(0, p.read_slots)[None]  # [1, ctx, 2, KVH, D]
        qs = torch.stack([q[o : o + n] for o in p.offsets]).transpose(1, 2)  # [P, H, n, D]
        ks = kv[:, :, 0].transpose(1, 2).repeat_interleave(groups, dim=1)
        vs = kv[:, :, 1].transpose(1, 2).repeat_interleave(groups, dim=1)
        mask = p.mask[layer.window]
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=layer.scaling
        )
        o = o.transpose(1, 2).reshape(len(p.offsets), n, -1)
        for i, off in enumerate(p.offsets):
            out[off : off + n] = o[i]

    @torch.inference_mode()
    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (the scheduler moved a sequence).

        All sources are read before any destination is written, so pairs may overlap.
        """
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for cache in self.kv_cache:
            cache[dst] = cache[src]


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


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


def greedy(logits: torch.Tensor) -> list[int]:
    """Argmax token for each row of ``step``'s logits [S, vocab]."""
    if not len(logits):
        return []
    return logits.argmax(-1).tolist()
