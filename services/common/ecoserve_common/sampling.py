"""Sampling parameters: their one definition and their one validation.

Every edge that accepts them (the OpenAI HTTP API, the gRPC API, the SDK before it sends) builds
a SamplingParams through `SamplingParams.checked` (or calls `validate`) so a bad value is refused
with the same message everywhere, and nothing that reaches the engine or a worker can raise there.
The proto fields bound what can cross the wire: `top_k` is uint32, `seed` uint64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_SEED = 2**64 - 1  # proto uint64
MAX_TOP_K = 2**31 - 1  # scheduler.proto int32 (worker.proto uint32)
MAX_TOKEN_ID = 2**32 - 1  # proto uint32


class InvalidSampling(ValueError):
    """A sampling parameter out of range; `field` names it (an OpenAI 400's `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise InvalidSampling naming the first bad field."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidSampling(
                "max_tokens", f"max_tokens must be an integer ({self.max_tokens!r})"
            )
        if self.max_tokens <= 0:
            raise InvalidSampling("max_tokens", f"max_tokens must be > 0 (got {self.max_tokens})")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidSampling(
                "temperature", f"temperature must be >= 0 (got {self.temperature})"
            )
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidSampling("top_p", f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidSampling("top_k", f"top_k must be in [0, {MAX_TOP_K}] (got {self.top_k})")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidSampling("seed", f"seed must be in [0, 2**64) (got {self.seed})")
        for t in self.stop_token_ids:
            if not 0 <= t <= MAX_TOKEN_ID:
                raise InvalidSampling("stop_token_ids", f"stop_token_ids: {t} is not a token id")

    @classmethod
    def checked(cls, **fields) -> SamplingParams:
        """Build and validate: the constructor every API edge uses."""
        fields["stop_token_ids"] = tuple(fields.get("stop_token_ids") or ())
        params = cls(**fields)
        params.validate()
        return params
