"""Weight-only int8 / int4 quantization of the worker's projections (`--quantization`).

Why: a batch-1 decode step of SmolLM2-135M in bf16 reads all ~270 MB of weights from DRAM for
one token, so single-stream speed is bound by bytes, not by arithmetic. int8 halves the bytes
of every projection, int4 (groups of 32, a scale and a zero per group) quarters them.

How: torch's own CPU kernels, no new dependency. `aten._weight_int8pack_mm` (int8 weights,
one scale per output channel) and `aten._weight_int4pack_mm_for_cpu` (4-bit weights packed by
`aten._convert_weight_to_int4pack_for_cpu`, scale and zero per group of 32 inputs). Both take
fp32, bf16 or fp16 activations (scales in the same dtype), but only their bf16 paths are fast:
with fp32 activations SmolLM2 decoded a single stream at 9.4 (int8) and 4.9 (int4) tok/s
against 24.0 dense, so the option needs bfloat16 (the default on CPUs with native bf16; fp16
was not measured). The int4 op is CPU-only by name and neither was tried on a GPU, so the
option is CPU only.

Hybrid: with a warm cache these kernels lose to oneDNN's prepacked bf16 weights once a step has
more than a few rows (bench/worker_quant.py: 2.5-3.3x slower at 16-64 rows): they are built
for the memory-bound matrix-vector case. So each quantized projection keeps the
runner's dense (prepacked) projection beside it and runs the quantized kernel only when the
step has at most `MAX_ROWS` rows (decode of a few streams); bigger steps (prefill, large
batches) run as before. The cost is memory: the quantized copy comes on top of the dense
weights (int8: +1 byte per weight, int4: +0.5 byte, plus the scales; on SmolLM2 +102 MiB for
int8, +63 MiB for int4, next to the ~256 MiB of bf16 projection weights the runner already
keeps twice, plain and prepacked).

SmolLM2 ships as a Q4_1 GGUF (groups of 32, w = q * d + m), dequantized by the converter: its
decoder weights hold at most 16 values per group of 32. int4 here uses the same grouping and
asymmetric min/max, so on that model it recovers the GGUF's own grid (up to bf16 rounding of
scale and zero) and loses nothing measurable. Its embeddings (= the tied lm_head) are finer
than 4 bits, which is why the lm_head stays dense (`QUANTIZE_LM_HEAD`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .dtypes import QUANTIZATIONS

__all__ = ["MAX_ROWS", "QUANTIZATIONS", "QuantProj", "check", "quantize_runner"]

INT4_GROUP = 32  # inputs per scale/zero: the GGUF Q4_1 block size; the finest the kernel takes
# The quantized kernels run for steps of at most this many rows (tokens in the step; for the
# lm_head, sampled rows), the dense ones above. Measured on SmolLM2, bf16, 1 thread, 2-core EPYC
# (bench/worker_quant.py --whole-model, results/worker-quant), ms per decode step, dense vs
# quantized: int4 24.6 vs 12.9 at 1 row, 23.2 vs 18.8 at 4, 23.2 vs 27.3 at 6; int8 24.6 vs
# 20.8 at 1 row, 27.1 vs 26.1 at 2 (a loss in another run: within noise), 22.3 vs 27.5 at 3.
MAX_ROWS = {"int8": 1, "int4": 4}
# Whether the lm_head (tied to the embeddings in SmolLM2: a quantized copy, the embedding
# table stays) is quantized too; it is the largest single projection (49152 x 576). Measured as
# above, with vs without it: int4 10.8 vs 12.9 ms per 1-row step (86.1 vs 70.1 tok/s single
# stream; bf16 39.1) but perplexity 4.161 vs 4.000 (bf16: 4.006) and teacher-forced top-1
# agreement with bf16 89.7 % vs 98.0 % (bf16's own floor, prefill vs decode: 98.1 %); int8 20.8
# vs 20.8 ms, a tie. Not worth it by default; `quantize_runner(..., lm_head=True)` does it.
QUANTIZE_LM_HEAD = False


def check(quantization: str, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """ValueError, saying why, where `quantization` cannot run on `device` (in `dtype`)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}"
        )
    if quantization == "none":
        return
    if torch.device(device).type != "cpu":
        raise ValueError(
            f"--quantization {quantization}: CPU only (torch's weight-only int8/int4 kernels "
            f"used here have no {torch.device(device).type} path); use --quantization none"
        )
    if dtype is not None and dtype != torch.bfloat16:
        raise ValueError(
            f"--quantization {quantization}: needs --dtype bfloat16, not {str(dtype)[6:]} "
            "(torch's int8/int4 kernels beat the dense path only in bf16; fp32: 2.6-4.9x slower)"
        )
    op = "_weight_int8pack_mm" if quantization == "int8" else "_weight_int4pack_mm_for_cpu"
    if not hasattr(torch.ops.aten, op):
        raise ValueError(
            f"--quantization {quantization}: this torch {torch.__version__} has no aten.{op}"
        )


class _Int8:
    """y = x (q * scale)^T: int8 weights [N, K], one scale per output channel (symmetric)."""

    __slots__ = ("q", "scale")

    def __init__(self, w: torch.Tensor) -> None:
        wf = w.float()
        scale = (wf.abs().amax(1) / 127).clamp(min=1e-12)
        self.q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(w.dtype)  # the kernel wants the activations' dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)

    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


class _Int4:
    """y = x W^T with W = q * s + lo per group of INT4_GROUP inputs (q in 0..15, asymmetric).

    The kernel computes (q - 8) * scale + zero, so it gets zero = lo + 8 * s; both are kept in
    the activations' dtype as [K / group, N, 2]."""

    __slots__ = ("packed", "scale_zero")

    def __init__(self, w: torch.Tensor) -> None:
        n, k = w.shape
        g = w.float().view(n, k // INT4_GROUP, INT4_GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        s = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.int32)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, k), 1)
        zero = lo + 8 * s
        self.scale_zero = torch.stack([s, zero], -1).transpose(0, 1).contiguous().to(w.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, INT4_GROUP, self.scale_zero
        )

    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zero.nbytes

    @staticmethod
    def fits(n: int, k: int) -> bool:
        """The packing wants N a multiple of 16 and K of the group size."""
        return n % 16 == 0 and k % INT4_GROUP == 0


class QuantProj:
    """A projection with a quantized copy: the quantized kernel for steps of at most
    `max_rows` rows, the dense projection (the runner's `_Proj`, prepacked) above."""

    __slots__ = ("dense", "quant", "bias", "max_rows")

    def __init__(
        self,
        dense: Callable[[torch.Tensor], torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        quantization: str,
        max_rows: int,
    ) -> None:
        self.dense, self.bias, self.max_rows = dense, bias, max_rows
        self.quant: _Int8 | _Int4 = _Int8(weight) if quantization == "int8" else _Int4(weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return self.dense(x)
        y = self.quant(x.contiguous())
        return y if self.bias is None else y.add_(self.bias)


@dataclass
class QuantReport:
    """What `quantize_runner` did: for the start-up log and the bench."""

    quantization: str
    max_rows: int
    projections: int  # quantized
    skipped: list[str]  # projections whose shape the kernel does not take (kept dense)
    lm_head: bool
    extra_bytes: int  # the quantized copies, on top of the dense weights

    def describe(self) -> str:
        if self.quantization == "none":
            return "quantization none"
        head = "with" if self.lm_head else "without"
        text = (
            f"quantization {self.quantization} ({self.projections} projections, {head} "
            f"lm_head) for steps of <= {self.max_rows} rows, dense above; "
            f"+{self.extra_bytes / 2**20:.1f} MiB"
        )
        return text + (f"; kept dense: {', '.join(self.skipped)}" if self.skipped else "")


def quantize_runner(
    runner,
    quantization: str,
    max_rows: int | None = None,
    lm_head: bool = QUANTIZE_LM_HEAD,
) -> QuantReport:
    """Wrap the runner's projections (every layer's qkv, o_proj, gate_up, down; the lm_head
    when `lm_head`) in `QuantProj`, used for steps of at most `max_rows` rows (default: the
    mode's `MAX_ROWS`). Their weights stay as they were (the dense path, and HF's modules,
    still use them). The caller checked `quantization` (ModelRunner does, before loading)."""
    if max_rows is None:
        max_rows = MAX_ROWS.get(quantization, 0)
    report = QuantReport(quantization, max_rows, 0, [], False, 0)
    if quantization == "none":
        return report

    def wrap(name: str, proj):
        n, k = proj.weight.shape
        if quantization == "int4" and not _Int4.fits(n, k):
            report.skipped.append(f"{name} [{n}, {k}]")
            return proj
        qp = QuantProj(proj, proj.weight, proj.bias, quantization, max_rows)
        report.projections += 1
        report.extra_bytes += qp.quant.nbytes()
        return qp

    for i, layer in enumerate(runner.layers):
        for name in ("qkv", "o_proj", "gate_up", "down"):
            setattr(layer, name, wrap(f"layer{i}.{name}", getattr(layer, name)))
    if lm_head:
        head = wrap("lm_head", runner.lm_head)
        report.lm_head = isinstance(head, QuantProj)
        runner.lm_head = head
    return report
