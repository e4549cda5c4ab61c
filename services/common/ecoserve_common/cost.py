"""Per-iteration latency model (simulator and sim worker) and its hardware/model profiles.

The simulator asks "how long does this forward pass take?" about a million times per sweep, so the
model is a handful of float multiplies over a `BatchShape`:

    t = c0                                        fixed per-iteration CPU / launch overhead
      + knee(w_mem, s_tok * T)                    linear layers over all T tokens in the batch
      + a_dec * decode_context_tokens             decode attention: reads every cached K/V token
      + a_dseq * decode_seqs                      decode attention: per-sequence work
      + sum over prefill chunks (c tokens after ctx cached ones) of
            c * (p_tok + p_lin * ctx + p_quad * c / 2)      prefill attention (causal)

`knee(w, x)` is the linear layers' roofline: reading the weights once costs `w_mem` however few
tokens there are (memory-bound), and past the knee each token costs `s_tok` (compute-bound). The
hard form is `max(w, x)`; measured GEMM curves bend smoothly into the knee (Vidur's A100 Llama-2-7B
profile is ~25% above the hard max at 128-256 tokens), so profiles carry an exponent `knee_p` and
use the p-norm `(w**p + x**p) ** (1/p)`; `knee_p=None` is the hard max. `p_tok` (prefill attention
cost linear in chunk length) is the other refinement over the design brief's form: Vidur's prefill
attention samples need it (a pure c*c fit is off by 30%), and it must not be lumped into `s_tok`
because decode tokens do not pay it.

All coefficients are in seconds (per token, per context token, ...). Profiles are JSON files
shipped in `ecoserve_common/profiles/` with a `sources` object that says where each constant came
from; the scheduler's `sim/fit_vidur.py` produces them, and nothing reads measured data at
simulation time. This module is the profile format and its evaluation, shared by the simulator and
the worker's sim backend; fitting lives in the scheduler (`sim/cost_model.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .plan import BatchShape

GIB = 1024**3

# Coefficients of the iteration-time model, in the order fit_profile's design matrix uses them.
COEFFICIENTS = ("c0", "s_tok", "p_tok", "a_dec", "a_dseq", "p_lin", "p_quad")


@dataclass(frozen=True, kw_only=True)
class Profile:
    """One model on one accelerator: the facts the KV ledger needs and the fitted latency terms."""

    name: str  # "<model>/<accelerator>", e.g. "llama-2-7b/a100-80gb"
    # Model facts.
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    params_b: float  # billions of parameters held in accelerator memory (embeddings included)
    bytes_per_param: int = 2
    max_model_len: int = 4096
    # Accelerator facts. mem_gb is GiB (2**30 bytes): an "80GB" card shows 81920 MiB.
    mem_gb: float
    mem_bw_tb_s: float
    peak_tflops: float  # dense bf16
    # Paged KV cache.
    block_size: int = 16
    gpu_mem_util: float = 0.9
    # Iteration-time model (seconds); see the module docstring.
    c0: float = 0.0
    w_mem: float = 0.0
    s_tok: float = 0.0
    knee_p: float | None = None
    a_dec: float = 0.0
    a_dseq: float = 0.0
    p_tok: float = 0.0
    p_lin: float = 0.0
    p_quad: float = 0.0
    # Mean relative error of the fit that produced the coefficients (None if not fitted).
    fit_rel_error: float | None = None
    sources: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("w_mem", *COEFFICIENTS):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{self.name}: coefficient {name}={value!r} must be finite >= 0")
        if self.knee_p is not None and not self.knee_p >= 1.0:
            raise ValueError(f"{self.name}: knee_p={self.knee_p!r} must be >= 1 or None")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, for one token: what a block of the paged cache stores per slot."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.bytes_per_param

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * self.bytes_per_param

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache that fit beside the weights in the usable share of memory."""
        usable = self.mem_gb * GIB * self.gpu_mem_util - self.weight_bytes
        return max(0, int(usable // self.kv_bytes_per_token))

    def num_blocks(self) -> int:
        return self.kv_capacity_tokens() // self.block_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """Strict on unknown keys (a typo should not silently fall back to a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown profile keys: {unknown}")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["sources"] = dict(kwargs.get("sources") or {})
        return cls(**kwargs)


class CostModel:
    """Iteration time of a batch on one profile. Coefficients are copied to plain attributes so
    `iteration_time` is only float arithmetic (it runs once per simulated iteration)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._c0 = profile.c0
        self._w = profile.w_mem
        self._s = profile.s_tok
        self._p = profile.knee_p
        self._inv_p = 1.0 / profile.knee_p if profile.knee_p is not None else 0.0
        self._w_pow = profile.w_mem**profile.knee_p if profile.knee_p is not None else 0.0
        self._a_dec = profile.a_dec
        self._a_dseq = profile.a_dseq
        self._p_tok = profile.p_tok
        self._p_lin = profile.p_lin
        self._p_half_quad = profile.p_quad / 2.0
        self._budgets: dict[tuple[float, int], int] = {}

    @classmethod
    def from_name(cls, name: str) -> CostModel:
        return cls(load_profile(name))

    def linear_time(self, tokens: float) -> float:
        """Linear layers over `tokens` tokens: weight-read floor, then compute-bound slope."""
        x = self._s * tokens
        if self._p is None:
            return self._w if self._w > x else x
        return (self._w_pow + x**self._p) ** self._inv_p

    def iteration_time(self, shape: BatchShape) -> float:
        """Seconds for one forward pass of `shape`; 0.0 for an empty batch (nothing runs)."""
        n_dec = shape.decode_seqs
        tokens = n_dec
        t = self._c0 + self._a_dec * shape.decode_context_tokens + self._a_dseq * n_dec
        p_tok, p_lin, p_hq = self._p_tok, self._p_lin, self._p_half_quad
        for c, ctx in shape.prefill_chunks:
            tokens += c
            t += c * (p_tok + p_lin * ctx + p_hq * c)
        if tokens <= 0:
            return 0.0
        return t + self.linear_time(tokens)

    def prefill_chunk_time(self, chunk_tokens: int, context_tokens: int = 0) -> float:
        """One iteration holding only this prefill chunk."""
        if chunk_tokens <= 0:
            return 0.0
        c = chunk_tokens
        attn = c * (self._p_tok + self._p_lin * context_tokens + self._p_half_quad * c)
        return self._c0 + self.linear_time(c) + attn

    def decode_step_time(self, batch: int, mean_context: float) -> float:
        """One iteration of `batch` decode sequences attending to `mean_context` tokens each."""
        if batch <= 0:
            return 0.0
        attn = self._a_dec * batch * mean_context + self._a_dseq * batch
        return self._c0 + self.linear_time(batch) + attn

    def token_budget(self, fraction: float = 0.9, step: int = 64, max_tokens: int = 1 << 20) -> int:
        """Smallest multiple of `step` tokens whose pure-prefill throughput reaches `fraction` of
        the asymptote: the knee past which more tokens per iteration buy little throughput and
        only add latency (Sarathi's chunk size).

        Throughput is T / (c0 + knee(w, s*T) + p_tok*T), whose asymptote is 1 / (s_tok + p_tok).
        The quadratic and context terms of prefill attention are left out on purpose: they depend
        on how the T tokens split into sequences, not on T, and would make the curve peak and fall
        instead of approaching an asymptote.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError("fraction must be in (0, 1)")
        key = (fraction, step)
        if key in self._budgets:
            return self._budgets[key]
        per_token = self._s + self._p_tok
        if per_token <= 0.0:
            raise ValueError(
                f"{self.profile.name}: s_tok + p_tok is 0, throughput has no asymptote"
            )
        budget = max_tokens
        for tokens in range(step, max_tokens + 1, step):
            elapsed = self._c0 + self.linear_time(tokens) + self._p_tok * tokens
            if per_token * tokens >= fraction * elapsed:
                budget = tokens
                break
        self._budgets[key] = budget
        return budget

    def prefill_time(self, prompt_tokens: int, token_budget: int | None = None) -> float:
        """Prefill of one prompt alone, in chunks of `token_budget` (default: the knee)."""
        budget = token_budget or self.token_budget()
        total = 0.0
        for start in range(0, max(0, prompt_tokens), budget):
            total += self.prefill_chunk_time(min(budget, prompt_tokens - start), start)
        return total

    def unloaded_jct(
        self, prompt_tokens: int, output_tokens: int, token_budget: int | None = None
    ) -> float:
        """Job completion time of a request running alone: chunked prefill (its last chunk samples
        the first output token), then `output_tokens - 1` decode steps at batch 1 whose context
        grows P+1, P+2, ...; the decode sum is closed-form because only a_dec depends on it."""
        total = self.prefill_time(prompt_tokens, token_budget)
        steps = max(0, output_tokens - 1)
        if steps:
            per_step = self._c0 + self.linear_time(1) + self._a_dseq
            context_sum = steps * prompt_tokens + steps * (steps + 1) / 2
            total += steps * per_step + self._a_dec * context_sum
        return total


# ---- fitting ---------------------------------------------------------------------------------


# ---- shipped profiles ------------------------------------------------------------------------


def _profiles_dir():
    return resources.files(__package__).joinpath("profiles")


def profile_filename(name: str) -> str:
    """ "llama-2-7b/a100-80gb" -> "llama-2-7b_a100-80gb.json"."""
    return name.replace("/", "_") + ".json"


def list_profiles() -> list[str]:
    """Names of the shipped profiles, e.g. ["llama-2-13b/a100-80gb", ...]."""
    names = []
    for entry in _profiles_dir().iterdir():
        if entry.name.endswith(".json"):
            names.append(json.loads(entry.read_text())["name"])
    return sorted(names)


def load_profile(name: str | Path) -> Profile:
    """A shipped profile by name ("llama-2-7b/a100-80gb" or its file stem), or a JSON path."""
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return Profile.from_dict(json.loads(path.read_text()))
    stem = str(name).removesuffix(".json")
    entry = _profiles_dir().joinpath(profile_filename(stem))
    if not entry.is_file():
        raise KeyError(f"no profile {name!r}; shipped: {', '.join(list_profiles())}")
    return Profile.from_dict(json.loads(entry.read_text()))


def save_profile(profile: Profile, path: str | Path) -> Path:
    """Write `profile` as JSON; a directory path gets the profile's standard file name."""
    path = Path(path)
    if path.is_dir():
        path = path / profile_filename(profile.name)
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    return path
