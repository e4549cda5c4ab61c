"""Vidur's measured operator timings and the per-part fits `fit_vidur` assembles into profiles.

Reads Vidur's Llama-2-7B operator tables (linear layers per token count, attention samples on
A100), fits each part of the iteration-time model (linear layers with `fit_profile`, attention
and the KV-cache write by relative non-negative least squares, the CPU overhead by least squares)
and holds the accelerator and model shapes the fits are scaled by. See `fit_vidur` for the method.
"""

from __future__ import annotations

import csv
import gzip
import math
from dataclasses import dataclass
from pathlib import Path

from .cost_model import Profile, fit_profile

MS = 1e-3
VIDUR = "Vidur (Agrawal et al., MLSys 2024; github.com/microsoft/vidur @7d47513, MIT)"

# Operators of one transformer layer in Vidur's mlp.csv. `emb` runs once per model, not per layer,
# and Vidur's own model time leaves it (and the LM head) out; so do we.
LAYER_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)

# Vidur data/profiling/a100/cpu_overheads.csv (commit 0633efa), meta-llama/Llama-2-7b-hf, TP 1:
# batch size -> sum of the median ms of the components Vidur's ExecutionTime._get_cpu_overhead adds
# (SCHEDULE + SAMPLER_E2E + PREPARE_INPUTS_E2E + PROCESS_MODEL_OUTPUTS + RAY_COMM_TIME).
VIDUR_CPU_OVERHEAD_MS = {
    8: 2.1270,
    16: 3.0114,
    24: 3.7639,
    32: 4.9279,
    40: 5.4788,
    48: 6.4357,
    56: 7.1489,
    64: 8.0484,
}


@dataclass(frozen=True)
class Accelerator:
    name: str
    vidur_name: str
    mem_gb: float
    mem_bw_tb_s: float
    peak_tflops: float
    source: str


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    intermediate: int
    params_b: float
    source: str

    @property
    def linear_params(self) -> float:
        """Weights the per-layer GEMMs read: q/k/v/o projections and the gated MLP."""
        head_dim = self.hidden // self.n_heads
        attn = self.hidden * (self.hidden + 2 * self.n_kv_heads * head_dim) + self.hidden**2
        return self.n_layers * (attn + 3 * self.hidden * self.intermediate)

    @property
    def attention_width(self) -> int:
        """Per-token attention work and KV bytes both scale with n_layers * hidden (no GQA)."""
        return self.n_layers * self.n_heads * (self.hidden // self.n_heads)


A100 = Accelerator(
    "a100-80gb",
    "a100",
    80.0,
    2.039,
    312.0,
    "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: 80 GB HBM2e (81920 MiB), 2,039 GB/s, "
    "312 TFLOPS dense BF16/FP16 tensor core",
)
H100 = Accelerator(
    "h100-80gb",
    "h100",
    80.0,
    3.35,
    989.0,
    "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: 80 GB HBM3, 3.35 TB/s, "
    "989 TFLOPS dense BF16 tensor core (1,979 with sparsity)",
)
LLAMA_7B = ModelShape(
    "llama-2-7b",
    32,
    4096,
    32,
    32,
    11008,
    6.74,
    "meta-llama/Llama-2-7b-hf config.json: 32 layers, hidden 4096, 32 heads = 32 KV heads, "
    "intermediate 11008, vocab 32000, max_position_embeddings 4096; 6.74B parameters",
)
LLAMA_13B = ModelShape(
    "llama-2-13b",
    40,
    5120,
    40,
    40,
    13824,
    13.0,
    "meta-llama/Llama-2-13b-hf config.json: 40 layers, hidden 5120, 40 heads = 40 KV heads, "
    "intermediate 13824, vocab 32000, max_position_embeddings 4096; 13.0B parameters",
)


# ---- reading Vidur's files -------------------------------------------------------------------


def vidur_dir(data_dir: Path) -> Path:
    """Accept either the shared data directory or its vidur_profiles/ subdirectory."""
    sub = data_dir / "vidur_profiles"
    return sub if sub.is_dir() else data_dir


def read_linear_ops(directory: Path, gpu: str) -> dict[int, float]:
    """num_tokens -> per-layer ms summed over LAYER_OPS (mean of duplicate rows), TP 1."""
    path = directory / f"{gpu}_Llama-2-7b-hf_mlp.csv.gz"
    sums: dict[int, list[float]] = {}
    with gzip.open(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            if int(row["num_tensor_parallel_workers"]) != 1:
                continue
            total = sum(float(row[f"time_stats.{op}.median"]) for op in LAYER_OPS)
            sums.setdefault(int(row["num_tokens"]), []).append(total)
    return {t: sum(v) / len(v) for t, v in sorted(sums.items())}


def read_samples(path: Path) -> list[tuple[float, ...]]:
    with path.open(newline="") as f:
        return [tuple(float(x) for x in row) for row in list(csv.reader(f))[1:]]


# ---- regressions -----------------------------------------------------------------------------


def relative_nnls(columns: list[list[float]], y: list[float]) -> tuple[list[float], float]:
    """Non-negative least squares in relative error; returns (coefficients, mean |rel error|)."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.array(columns, dtype=float).T
    yy = np.array(y, dtype=float)
    coef, _ = nnls(a / yy[:, None], np.ones_like(yy))
    err = float(np.mean(np.abs(a @ coef / yy - 1.0)))
    return coef.tolist(), err


def fit_cpu_overhead() -> tuple[float, float]:
    """(intercept ms, ms per sequence) of Vidur's CPU overhead, least squares over batch size."""
    xs = list(VIDUR_CPU_OVERHEAD_MS)
    ys = list(VIDUR_CPU_OVERHEAD_MS.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - slope * mx, slope


@dataclass(frozen=True)
class Parts:
    """Fitted pieces for Llama-2-7B on one accelerator (per-layer ms unless stated)."""

    accel: Accelerator
    w_mem: float  # s, whole 7B model
    s_tok: float  # s per token, whole 7B model
    knee_p: float | None
    linear_err: float
    linear_err_hard_max: float
    dec: tuple[float, float, float]  # a0, a1 (per seq), a3 (per context token)
    dec_err: float
    pre: tuple[float, float, float, float]  # b0, b1 (c), b2 (c^2), b3 (c*kv)
    pre_err: float
    kvsave: tuple[float, float]  # k0, k1 per token
    cpu_ms: float
    cpu_per_seq_ms: float
    attention_scaled: bool


def read_attention_samples(directory: Path):
    """Vidur's A100 Llama-2-7B attention samples: decode (b, kv, ms), prefill (c, kv, ms) and
    KV-cache write (n, ms), per layer."""
    stem = directory / "a100_Llama-2-7b-hf_attention"
    return tuple(
        read_samples(Path(f"{stem}_{kind}_samples.csv")) for kind in ("decode", "prefill", "kvsave")
    )


def fit_attention(directory: Path):
    """Per-layer regressions: decode a0 + a1*b + a3*b*kv, prefill b0 + b1*c + b2*c^2 + b3*c*kv
    (the c term is why the model has p_tok), KV write k0 + k1*n."""
    dec, pre, kvs = read_attention_samples(directory)
    dcoef, derr = relative_nnls(
        [[1.0] * len(dec), [b for b, _, _ in dec], [b * kv for b, kv, _ in dec]],
        [t for _, _, t in dec],
    )
    pcoef, perr = relative_nnls(
        [
            [1.0] * len(pre),
            [c for c, _, _ in pre],
            [c * c for c, _, _ in pre],
            [c * kv for c, kv, _ in pre],
        ],
        [t for _, _, t in pre],
    )
    kcoef, _ = relative_nnls([[1.0] * len(kvs), [n for n, _ in kvs]], [t for _, t in kvs])
    return tuple(dcoef), derr, tuple(pcoef), perr, tuple(kcoef)


def fit_parts(directory: Path, accel: Accelerator) -> Parts:
    dec, dec_err, pre, pre_err, kvsave = fit_attention(directory)
    scaled = accel.vidur_name != "a100"
    if scaled:  # no attention samples for this GPU: scale A100's by the roofline ratios
        bw = A100.mem_bw_tb_s / accel.mem_bw_tb_s
        fl = A100.peak_tflops / accel.peak_tflops
        dec = (dec[0], dec[1] * bw, dec[2] * bw)
        pre = (pre[0], pre[1] * fl, pre[2] * fl, pre[3] * fl)
        kvsave = (kvsave[0] * bw, kvsave[1] * bw)
    ops = read_linear_ops(directory, accel.vidur_name)
    layers = LLAMA_7B.n_layers
    rows = [
        {"decode_seqs": t, "latency_s": layers * (ms + kvsave[0] + kvsave[1] * t) * MS}
        for t, ms in ops.items()
    ]
    base = Profile(name="linear", **_model_kwargs(LLAMA_7B), **_accel_kwargs(accel))
    lin = fit_profile(base, rows, fixed=("c0", "a_dseq"), fit_knee_p=True, source="Vidur rows")
    hard = fit_profile(base, rows, fixed=("c0", "a_dseq"), source="Vidur rows")  # knee_p None
    cpu_ms, cpu_per_seq_ms = fit_cpu_overhead()
    return Parts(
        accel=accel,
        w_mem=lin.w_mem,
        s_tok=lin.s_tok,
        knee_p=lin.knee_p,
        linear_err=lin.fit_rel_error or 0.0,
        linear_err_hard_max=hard.fit_rel_error or 0.0,
        dec=dec,
        dec_err=dec_err,
        pre=pre,
        pre_err=pre_err,
        kvsave=kvsave,
        cpu_ms=cpu_ms,
        cpu_per_seq_ms=cpu_per_seq_ms,
        attention_scaled=scaled,
    )


def sig(x: float, digits: int = 4) -> float:
    """Round to significant digits so the shipped JSON is readable and stable across BLAS builds."""
    if x == 0.0:
        return 0.0
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _model_kwargs(model: ModelShape) -> dict:
    return {
        "n_layers": model.n_layers,
        "hidden": model.hidden,
        "n_heads": model.n_heads,
        "n_kv_heads": model.n_kv_heads,
        "params_b": model.params_b,
    }


def _accel_kwargs(accel: Accelerator) -> dict:
    return {
        "mem_gb": accel.mem_gb,
        "mem_bw_tb_s": accel.mem_bw_tb_s,
        "peak_tflops": accel.peak_tflops,
    }
