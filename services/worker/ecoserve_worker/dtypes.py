"""Which dtype a worker runs in when `--dtype` is not given: the fastest the machine has.

- CUDA: bfloat16 where the GPU supports it (Ampere and newer), else float16.
- CPU: bfloat16 where the CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16) and
  oneDNN's bf16 kernels are built in; float32 otherwise. Without native bf16, oneDNN emulates
  it and the step gets slower, not faster.

Measured on a 2-core EPYC with avx512_bf16 (SmolLM2-135M, 1 torch thread, oneDNN-prepacked
weights, bench/worker.py): a 16-row decode step 77 ms in float32, 52 ms in bfloat16.
"""

from __future__ import annotations

from .cpuinfo import cpu_flags

__all__ = ["DTYPES", "QUANTIZATIONS", "cpu_flags", "cpu_has_native_bf16", "default_dtype"]

DTYPES = ("float32", "bfloat16", "float16")
# Weight-only quantization of the projections (`--quantization`, quant.py); kept here, without
# torch, so the command line can list them before torch loads.
QUANTIZATIONS = ("none", "int8", "int4")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes bf16 dot products natively and torch's oneDNN can use them."""
    import torch

    flags = cpu_flags() if flags is None else flags
    return bool(flags & NATIVE_BF16_FLAGS) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def default_dtype(device: str, flags: frozenset[str] | None = None) -> str:
    """The dtype name a worker on `device` ("cpu", "cuda", "cuda:1") runs in by default."""
    kind = device.partition(":")[0]
    if kind == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16(flags) else "float32"
