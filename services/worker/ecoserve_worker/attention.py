"""Paged attention over the scheduler's block tables: the KV pool, the per-step index tensors
built straight from a plan's columns (`StepInputs`), and the attention calls.

Each layer has a pool ``[2, kv_heads, num_blocks, block_size, head_dim]``: head-major, so one
gather of a group's blocks (along the block dimension, K and V of every head at once) leaves
each head's K and V contiguous, ready for batched matmuls with no further copy. A step's new K/V
are written to the slots its block tables name, then every row attends:

- single-token rows (decodes) in one call of the C++ kernel (`kernels.paged_decode`), which
  reads K/V through the block tables with no gather copy (results/worker-attention, this
  2-core CPU, 1 thread, bf16, 64 rows x 320 tokens: 2.5 ms per layer against 5.5 for the torch
  path; a SmolLM2 step 162 ms against 235); where it is unavailable (not CPU, not fp32/bf16,
  no compiler, ECOSERVE_KERNELS=0), in a few padded calls grouped by context length: a gather
  of the blocks, two batched matmuls and a softmax (the reference path);
- fresh prompts (start 0) of one length together, causally over their own new K/V;
- a chunk that continues a sequence on its own, over its pages.

Everything a layer needs is derived once per step (`PagedAttention.batch`), checked on the
Python columns first, so the per-layer path does no per-sequence Python for decode rows.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from ecoserve_common.plan import StepInputs

from . import kernels
from .grouping import group_by_width, longs

# A separate attention call per layer costs about what this many padded context blocks do
# (measured on CPU: ~4 small ops per call against ~1 us per context token per step).
GROUP_OVERHEAD_BLOCKS = 16


@dataclass
class PrefillGroup:
    """Prefill chunks of a step that are attended together.

    A group of fresh prompts (start_pos 0) of one length attends to its own new K/V directly;
    a chunk that continues a sequence reads its earlier K/V from the pool (a group of one)."""

    offsets: list[int]  # first token of each chunk in the flattened batch
    n: int  # tokens per chunk
    read_slots: torch.Tensor | None  # [start + n] pool slots, None for fresh prompts
    mask: dict[int | None, torch.Tensor | None]  # per window: [n, ctx] bool, None = causal


@dataclass
class DecodeGroup:
    """Decode rows of similar context length, attended in one padded call per layer."""

    rows: slice | torch.Tensor  # their places among the step's decode rows
    blocks: torch.Tensor  # [n * W] their block tables, padded with block 0 (masked out)
    batch: int  # n
    width: int  # W, in blocks
    masks: dict[int | None, torch.Tensor]  # per window: [1, n, 1, W * block_size], 0 or -inf
    # The C++ kernel's one group of every row, ragged (no masks): its tables and contexts.
    tables: torch.Tensor | None = None  # [n, W] int32 block tables, padding never read
    lens: torch.Tensor | None = None  # [n] int32 tokens attended to: position + 1


@dataclass
class DecodeRows:
    """All single-token rows of a step, attended in a few padded calls per layer."""

    rows: slice | torch.Tensor  # their token indices: a slice when they lead the batch
    batch: int
    groups: list[DecodeGroup]


@dataclass
class ForwardBatch:
    """The tensors one forward pass reads, built once per step from the StepInputs."""

    ids: torch.Tensor  # [T] token ids of all rows, concatenated
    positions: torch.Tensor  # [T] absolute positions
    write_slots: torch.Tensor  # [T] pool slots the new K/V go to
    max_pos: int  # the largest position of the step (rotary tables cover it)
    prefills: list[PrefillGroup]
    decode: DecodeRows | None
    last: torch.Tensor | None  # [S] last token of each sampling row; None: every token is one


class PagedAttention:
    """The KV pool of every layer and the attention that reads and writes it."""

    def __init__(
        self,
        windows: Sequence[int | None],
        num_blocks: int,
        block_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.windows = list(windows)  # per layer: sliding window, None for full attention
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        shape = (2, num_kv_heads, num_blocks, block_size, head_dim)
        # kv_cache[layer][0, head, block, offset] is K, [1, ...] is V.
        self.kv_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.windows]
        self._scratch = torch.empty(0, dtype=dtype, device=device)
        cpu = torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        self.kernel = kernels.paged_decode() if cpu else None  # None: the torch decode path

    # ---- per step: the plan's columns -> index tensors -------------------------------------

    def batch(self, inp: StepInputs) -> ForwardBatch:
        """Check a step's rows against the pool and build the tensors its forward pass reads."""
        blocks = inp.block_ids
        if blocks and (min(blocks) < 0 or max(blocks) >= self.num_blocks):
            offs = list(accumulate(inp.table_lens, initial=0))
            r = next(
                r
                for r in range(len(inp))
                if any(not 0 <= b < self.num_blocks for b in blocks[offs[r] : offs[r + 1]])
            )
            table = blocks[offs[r] : offs[r + 1]]
            raise ValueError(
                f"block table {table} of {inp.request_ids[r]!r} outside pool of {self.num_blocks}"
            )
        if inp.query_lens is None:
            return self._decode_batch(inp)
        return self._mixed_batch(inp)

    def _decode_batch(self, inp: StepInputs) -> ForwardBatch:
        """The hot path: every row feeds one token. Column-wise, straight off the wire."""
        bs, dev = self.block_size, self.device
        starts, lens, blocks = inp.positions, inp.table_lens, inp.block_ids
        offs = list(accumulate(lens, initial=0))
        need = [p // bs for p in starts]
        if any(i >= n for i, n in zip(need, lens, strict=True)):
            i, n = next((i, n) for i, n in zip(need, lens, strict=True) if i >= n)
            raise ValueError(f"block table has {n} blocks, positions need {i + 1}")
        write = [blocks[o + i] * bs + p % bs for o, i, p in zip(offs, need, starts, strict=False)]
        if len(set(write)) != len(write):
            raise ValueError("two tokens in one step write the same KV slot")
        rows = inp.sample_rows
        return ForwardBatch(
            longs(inp.token_ids, dev),
            longs(starts, dev),
            longs(write, dev),
            max(starts, default=0),
            [],
            self._decode_rows(slice(0, len(starts)), offs, lens, starts, blocks),
            None if rows is None else longs(rows, dev),
        )

    def _mixed_batch(self, inp: StepInputs) -> ForwardBatch:
        """Prefill chunks (and maybe decode rows): every token of every row, flattened."""
        bs, dev = self.block_size, self.device
        blocks = inp.block_ids
        positions: list[int] = []
        write: list[int] = []
        ends: list[int] = []  # each row's last token in the flattened batch
        fresh: dict[int, list[int]] = {}  # length -> offsets of fresh prompts
        chunks: list[tuple[int, int, int, list[int]]] = []  # offset, n, start, table
        dec_rows: list[int] = []
        dec_offs: list[int] = []
        dec_lens: list[int] = []
        dec_pos: list[int] = []
        tok = 0
        tbl = 0
        for rid, n, start, tlen in zip(
            inp.request_ids, inp.query_lens, inp.positions, inp.table_lens, strict=True
        ):
            if n == 0:
                raise ValueError(f"sequence {rid!r} has no tokens in this step")
            end = start + n
            needed = (end - 1) // bs + 1
            if tlen < needed:
                raise ValueError(f"block table has {tlen} blocks, positions need {needed}")
            table = blocks[tbl : tbl + needed]
            positions.extend(range(start, end))
            write.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if n == 1:
                dec_rows.append(tok)
                dec_offs.append(tbl)
                dec_lens.append(tlen)
                dec_pos.append(start)
            elif start == 0:
                fresh.setdefault(n, []).append(tok)
            else:
                chunks.append((tok, n, start, table))
            tok += n
            tbl += tlen
            ends.append(tok - 1)
        if len(set(write)) != len(write):
            raise ValueError("two tokens in one step write the same KV slot")
        windows = set(self.windows)

        prefills = [
            PrefillGroup(offs, n, None, {w: self._fresh_mask(n, w) for w in windows})
            for n, offs in fresh.items()
        ]
        for off, n, start, table in chunks:
            end = start + n
            pos = torch.arange(end, device=dev)
            t = longs(table, dev)
            read_slots = (t[:, None] * bs + torch.arange(bs, device=dev)).view(-1)[:end]
            q_pos = pos[start:, None]
            causal = pos[None] <= q_pos
            masks = {w: causal if w is None else causal & (pos[None] > q_pos - w) for w in windows}
            prefills.append(PrefillGroup([off], n, read_slots, masks))

        decode = None
        if dec_rows:
            rows: slice | torch.Tensor = slice(0, len(dec_rows))
            if dec_rows[-1] != len(dec_rows) - 1:  # not the leading rows of the batch
                rows = longs(dec_rows, dev)
            decode = self._decode_rows(rows, dec_offs, dec_lens, dec_pos, blocks)

        sample = inp.sample_rows
        last = ends if sample is None else [ends[r] for r in sample]
        return ForwardBatch(
            longs(inp.token_ids, dev),
            longs(positions, dev),
            longs(write, dev),
            max(positions),
            prefills,
            decode,
            longs(last, dev),
        )

    def _decode_rows(self, rows, offs, lens, starts, blocks) -> DecodeRows:
        """Block tables and masks of single-token rows at positions ``starts``, grouped by
        context length. Row i's table is ``blocks[offs[i] : offs[i] + lens[i]]``; it may run
        past its position (blocks reserved for later tokens): only the blocks up to the
        position are read. With the C++ kernel: one group, ragged, no masks."""
        bs = self.block_size
        widths = [p // bs + 1 for p in starts]
        if self.kernel is not None:  # one call over ragged rows
            return DecodeRows(rows, len(starts), [self._kernel_group(offs, starts, widths, blocks)])
        groups = [
            self._decode_group(idx, offs, lens, starts, widths, blocks)
            for idx in group_by_width(widths, GROUP_OVERHEAD_BLOCKS)
        ]
        return DecodeRows(rows, len(starts), groups)

    def _decode_group(self, idx: list[int], offs, lens, starts, widths, blocks) -> DecodeGroup:
        dev = self.device
        width = max(widths[i] for i in idx)
        flat: list[int] = []
        for i in idx:
            k = min(lens[i], width)
            flat += blocks[offs[i] : offs[i] + k]
            if k < width:
                flat += [0] * (width - k)
        ctx = torch.arange(width * self.block_size, device=dev)  # [C]
        pos = longs([starts[i] for i in idx], dev)[:, None]  # [n, 1]
        valid = ctx[None] <= pos
        masks = {}
        for w in set(self.windows):  # additive masks: SDPA's CPU kernel is ~2x faster than bool
            m = valid if w is None else valid & (ctx[None] > pos - w)
            bias = torch.zeros(m.shape, dtype=self.dtype, device=dev)
            masks[w] = bias.masked_fill_(~m, float("-inf"))[None, :, None, :]
        in_order = idx == list(range(idx[0], idx[0] + len(idx)))
        rows = slice(idx[0], idx[0] + len(idx)) if in_order else longs(idx, dev)
        return DecodeGroup(rows, longs(flat, dev), len(idx), width, masks)

    def _kernel_group(self, offs, starts, widths, blocks) -> DecodeGroup:
        """All rows for the kernel: tables padded with block 0, which it never reads."""
        width, n = max(widths), len(starts)
        flat: list[int] = []
        for o, w in zip(offs, widths, strict=False):  # offs may carry one more (the end)
            flat += blocks[o : o + w]
            flat += [0] * (width - w)
        tables = torch.frombuffer(array.array("i", flat), dtype=torch.int32).view(n, width)
        lens = torch.frombuffer(array.array("i", [p + 1 for p in starts]), dtype=torch.int32)
        return DecodeGroup(slice(0, n), tables.view(-1), n, width, {}, tables, lens)

    def _fresh_mask(self, n: int, window: int | None) -> torch.Tensor | None:
        """Mask of a fresh n-token prompt: None (plain causal) unless a window cuts it."""
        if window is None or window >= n:
            return None
        pos = torch.arange(n, device=self.device)
        return (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - window)

    def _buffer(self, numel: int) -> torch.Tensor:
        """A scratch tensor of at least `numel` elements, kept between steps. The decode
        gather is the largest temporary of a step (B x context x KV row); allocating it fresh
        each layer cost page faults worth ~5x the copy itself (measured, CPU)."""
        if self._scratch.numel() < numel:
            self._scratch = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self._scratch[:numel]

    # ---- per layer -------------------------------------------------------------------------

    def __call__(self, li: int, q, new_kv, scaling: float, batch: ForwardBatch) -> torch.Tensor:
        """Write layer `li`'s new K/V [T, 2, KVH, D] into the pool, attend q [T, H, D];
        returns [T, H * D].

        All writes happen before any read, so a chunk attends to itself causally through the
        pool exactly as earlier chunks do.
        """
        kvh, d = self.num_kv_heads, self.head_dim
        pool = self.kv_cache[li].view(2, kvh, -1, d)  # [2, KVH, slot, D]
        pool.index_copy_(2, batch.write_slots, new_kv.permute(1, 2, 0, 3))
        window = self.windows[li]
        dec = batch.decode
        if dec is not None and not batch.prefills:  # pure decode step: one call, no scatter
            return self._decode_attention(li, window, scaling, q, dec)
        out = q.new_empty(q.shape[0], self.num_heads * d)
        if dec is not None:
            rows = dec.rows
            qd = q[rows] if isinstance(rows, slice) else q.index_select(0, rows)
            out[rows] = self._decode_attention(li, window, scaling, qd, dec)
        for p in batch.prefills:
            self._prefill_attention(window, scaling, q, new_kv, pool, p, out)
        return out

    def _decode_attention(self, li, window, scaling, q, dec: DecodeRows) -> torch.Tensor:
        """Attend all single-token rows, q [B, H, D] -> [B, H * D]: one padded call per group.

        The query heads sharing a KV head ride in the matmul's row dimension
        ([KVH, n, groups, D] against [KVH, n, C, D]), so K/V are never repeated; the mask
        covers keys only, so each of those "queries" sees exactly its row's context.
        """
        if len(dec.groups) == 1:
            return self._attend_group(li, window, scaling, q, dec.groups[0])
        out = q.new_empty(dec.batch, self.num_heads * self.head_dim)
        for g in dec.groups:
            qg = q[g.rows] if isinstance(g.rows, slice) else q.index_select(0, g.rows)
            o = self._attend_group(li, window, scaling, qg, g)
            if isinstance(g.rows, slice):
                out[g.rows] = o
            else:
                out.index_copy_(0, g.rows, o)
        return out

    def _attend_group(self, li, window, scaling, q, g: DecodeGroup) -> torch.Tensor:
        if g.tables is not None:
            return self.kernel(q, self.kv_cache[li], g.tables, g.lens, window or 0, scaling)
        kvh, d, bs = self.num_kv_heads, self.head_dim, self.block_size
        # [2 * KVH, block, block_size * D]: a gather along blocks takes every head's K and V.
        blocks = self.kv_cache[li].view(2 * kvh, self.num_blocks, bs * d)
        n_blocks = g.blocks.numel()
        kv = self._buffer(2 * kvh * n_blocks * bs * d).view(2 * kvh, n_blocks, bs * d)
        torch.index_select(blocks, 1, g.blocks, out=kv)
        kv = kv.view(2, kvh, g.batch, g.width * bs, d)  # K then V, each [KVH, n, C, D]
        qg = q.reshape(g.batch, kvh, self.num_heads // kvh, d).transpose(0, 1)  # [KVH, n, G, D]
        scores = torch.matmul(qg, kv[0].transpose(-1, -2)).mul_(scaling).add_(g.masks[window])
        probs = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, kv[1]).transpose(0, 1).reshape(g.batch, -1)

    def _prefill_attention(self, window, scaling, q, new_kv, pool, p: PrefillGroup, out) -> None:
        """Attend a group of prefill chunks and write their rows of ``out``."""
        n, groups = p.n, self.num_heads // self.num_kv_heads
        if p.read_slots is None:  # fresh prompts: their K/V are this step's, in order
            kv = torch.stack([new_kv[o : o + n] for o in p.offsets])  # [P, n, 2, KVH, D]
            ks, vs = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [P, KVH, n, D]
        else:  # a continued chunk: its pages, already head-major
            kv = pool.index_select(2, p.read_slots)  # [2, KVH, ctx, D]
            ks, vs = kv[0][None], kv[1][None]  # [1, KVH, ctx, D]
        qs = torch.stack([q[o : o + n] for o in p.offsets]).transpose(1, 2)  # [P, H, n, D]
        ks = ks.repeat_interleave(groups, dim=1)
        vs = vs.repeat_interleave(groups, dim=1)
        mask = p.mask[window]
        o = F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scaling
        )
        o = o.transpose(1, 2).reshape(len(p.offsets), n, -1)
        for i, off in enumerate(p.offsets):
            out[off : off + n] = o[i]

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (the scheduler moved a sequence).

        All sources are read before any destination is written, so pairs may overlap.
        """
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for cache in self.kv_cache:
            cache[:, :, dst] = cache[:, :, src]
