"""Run a Hugging Face Llama-family causal LM over a paged KV cache the scheduler assigns.

The scheduler owns the KV ledger: every step it names, per sequence, which token ids to run, the
position they start at and the block table (physical blocks, in logical order). This module only
executes: `ModelRunner.forward` takes a step's columns (`StepInputs`, as decoded off the wire)
and returns the logits of the rows that sample. It loads the HF model and keeps its weights
(embeddings, norms, lm_head, rotary embedding), but runs the decoder layers itself: q/k/v and
gate/up are fused into one matmul each (the HF modules' weights become views of the fused
tensors, so memory is not doubled); attention over the paged pool is `attention.py`, sampling
`sampling.py`. Any block can hold any sequence's tokens, and a sequence can be moved or
recomputed without the worker keeping state.

Why not HF's own forward: the model is tiny next to the Python around it, so per-layer calls are
what a step costs; this path makes ~8 kernel calls per layer where HF's makes ~40.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ecoserve_common.plan import StepInputs
from ecoserve_common.sampling import SamplingParams

from . import kernels, quant
from .attention import PagedAttention
from .sampling import greedy, make_generator, sample

__all__ = ["ModelRunner", "SeqInput", "can_prepack", "greedy", "inputs_from_rows"]
__all__ += ["make_generator", "sample"]

# Architectures whose decoder layers have the Llama shape (pre-norm, q/k/v/o, rotary, gated MLP).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# One sequence of a step: (request_id, token_ids, start_pos, block_table).
SeqInput = tuple[str, Sequence[int], int, Sequence[int]]


class _Proj:
    """One projection, y = x W^T + b. On CPU (fp32, or bf16 where oneDNN has bf16 kernels) the
    weight is kept prepacked in oneDNN's blocked layout (the layout torch.compile's CPU backend
    uses) instead: decode steps are mostly small projections, and prepacking is what makes
    them fast. Measured on this 2-core EPYC (avx512_bf16), 1 thread, 16 rows: SmolLM2's
    gate/up [3072, 576] 765 us plain fp32, 536 packed fp32, 368 plain bf16, 279 packed bf16;
    its lm_head [49152, 576] 23.6, 11.1, 12.1 and 6.5 ms. The packed copy sits beside the
    plain weights (HF's modules still reference them), so it costs the weight memory once
    more: it is only made where the decoder weights are under 2 GiB."""

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
    """Whether _Proj can use oneDNN's prepacked weights here (CPU, fp32 or bf16)."""
    if not (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    ):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


@dataclass
class _Layer:
    """One decoder layer's weights, fused where HF keeps them apart."""

    in_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    # Each projection a `_Proj`, or a `quant.QuantProj` around one with --quantization.
    qkv: _Proj | quant.QuantProj  # [(H + 2 * KVH) * D, hidden]: q, then k, then v rows
    o_proj: _Proj | quant.QuantProj
    gate_up: _Proj | quant.QuantProj  # [2 * I, hidden]: gate rows, then up rows
    down: _Proj | quant.QuantProj
    act: Callable[[torch.Tensor], torch.Tensor]
    window: int | None  # sliding window, None for full attention
    scaling: float


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
        quantization: str = "none",
        quant_max_rows: int | None = None,
    ) -> None:
        """`quantization` none|int8|int4: weight-only quantized copies of the projections, run
        for steps of at most `quant_max_rows` rows (default: the mode's measured threshold,
        `quant.MAX_ROWS`); ValueError where it cannot run."""
        quant.check(quantization, torch.device(device), dtype)  # before the slow load
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
        # None: prepack where it can (CPU, fp32/bf16) and the decoder weights are under 2 GiB.
        layer_bytes = sum(p.numel() * p.element_size() for p in base.layers.parameters())
        if prepack is None:
            prepack = can_prepack(self.device, dtype) and layer_bytes < 2**31
        self.prepack = prepack
        self.layers = [self._fuse_layer(i, layer) for i, layer in enumerate(base.layers)]
        self.windows = [layer.window for layer in self.layers]
        self.norm_eps = _eps(base.norm)
        head = self.model.lm_head
        self.lm_head: _Proj | quant.QuantProj = _Proj(head.weight.detach(), head.bias, prepack)
        self.quant = quant.quantize_runner(self, quantization, quant_max_rows)
        self.attention = PagedAttention(
            self.windows,
            num_blocks,
            block_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            dtype,
            self.device,
        )
        self.kv_cache = self.attention.kv_cache  # [layer][0 = K / 1 = V, head, block, offset, :]
        # cos/sin per position, grown on demand; HF's "dynamic" rope changes with length, so it
        # is computed per step instead.
        self._rope_static = "dynamic" not in str(getattr(base.rotary_emb, "rope_type", ""))
        self._cos = self._sin = torch.empty(0, self.head_dim, dtype=dtype, device=self.device)
        # The C++ glue (residual add + RMSNorm, SiLU * up, rotary) where it builds: a decode
        # step is small enough that the per-call cost of ~10 tiny ATen ops per layer shows.
        cpu_glue = self.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        self.fused = kernels.fused_ops() if cpu_glue else None

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
    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Run one iteration over a mixed batch; return the last-position logits of each row
        that samples (`inp.sample_rows`, every row when None) as one float tensor [S, vocab].

        Prefill chunks and single-token decodes share the projections and MLP (all new tokens
        are flattened into one batch, where the compute is). Attention runs all decode rows in
        a few padded calls per layer, fresh prompts of one length together, and each continued
        chunk on its own over its pages.
        """
        if not len(inp):
            return torch.empty(0, self.config.vocab_size, device=self.device)
        batch = self.attention.batch(inp)
        base = self.model.model
        x = base.embed_tokens(batch.ids)  # [T, hidden]
        cos, sin = self._rope(batch.positions, batch.max_pos)
        if self.fused is not None:
            x = self._layers_fused(x, cos, sin, batch)
        else:
            x = self._layers_torch(x, cos, sin, batch)
        if batch.last is not None:
            x = x.index_select(0, batch.last)
        x = F.rms_norm(x, (self.hidden_size,), base.norm.weight, self.norm_eps)
        return self.lm_head(x).float()

    def _layers_torch(self, x: torch.Tensor, cos, sin, batch) -> torch.Tensor:
        """The decoder layers in eager torch: the reference for `_layers_fused`."""
        hidden, n_tok = self.hidden_size, x.shape[0]
        nh, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        for li, layer in enumerate(self.layers):
            h = F.rms_norm(x, (hidden,), layer.in_norm, layer.eps)
            qkv = layer.qkv(h).view(n_tok, nh + 2 * kvh, d)
            qk = qkv[:, : nh + kvh]
            rotated = _rotate_half(qk).mul_(sin).addcmul_(qk, cos)
            qk.copy_(rotated)  # q and k rotated in place, so k lands next to v for one write
            new_kv = qkv[:, nh:].view(n_tok, 2, kvh, d)  # rotated k, then v
            attn = self.attention(li, qkv[:, :nh], new_kv, layer.scaling, batch)
            x = x + layer.o_proj(attn)
            h = F.rms_norm(x, (hidden,), layer.post_norm, layer.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(layer.act(gate) * up)
        return x

    def _layers_fused(self, x: torch.Tensor, cos, sin, batch) -> torch.Tensor:
        """The decoder layers with the C++ glue: x is the residual stream, updated in place by
        add_rms_norm (each layer's output is added at the next norm, the last one here)."""
        ops, n_tok = self.fused, x.shape[0]
        nh, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = x.contiguous()
        delta = None  # the previous layer's MLP output, not yet added to x
        for li, layer in enumerate(self.layers):
            h = ops.add_rms_norm(x, delta, layer.in_norm, layer.eps)
            qkv = layer.qkv(h).view(n_tok, nh + 2 * kvh, d)
            ops.rope_(qkv[:, : nh + kvh], cos, sin)  # q and k in place, k next to v
            new_kv = qkv[:, nh:].view(n_tok, 2, kvh, d)
            attn = self.attention(li, qkv[:, :nh], new_kv, layer.scaling, batch)
            h = ops.add_rms_norm(x, layer.o_proj(attn), layer.post_norm, layer.eps)
            if layer.act is F.silu:
                delta = layer.down(ops.silu_mul(layer.gate_up(h)))
            else:
                gate, up = layer.gate_up(h).chunk(2, dim=-1)
                delta = layer.down(layer.act(gate) * up)
        return x + delta if delta is not None else x

    def step(self, seqs: Sequence[SeqInput]) -> torch.Tensor:
        """`forward` over row tuples (request_id, token_ids, start_pos, block_table), every
        row sampling: logits [len(seqs), vocab]. For tests, profiling and benches."""
        return self.forward(inputs_from_rows(seqs))

    @torch.inference_mode()
    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (the scheduler moved a sequence).

        All sources are read before any destination is written, so pairs may overlap.
        """
        self.attention.copy_blocks(pairs)


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def inputs_from_rows(seqs: Sequence[SeqInput], step_id: int = 0) -> StepInputs:
    """StepInputs of row tuples (request_id, token_ids, start_pos, block_table), every row
    sampling greedily."""
    rids = [s[0] for s in seqs]
    lens = [len(s[1]) for s in seqs]
    return StepInputs(
        step_id,
        "",
        rids,
        [s[2] for s in seqs],
        [t for s in seqs for t in s[1]],
        [len(s[3]) for s in seqs],
        [b for s in seqs for b in s[3]],
        [SamplingParams()],
        [0] * len(seqs),
        0,
        None if all(n == 1 for n in lens) else lens,
    )
