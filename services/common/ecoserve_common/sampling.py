"""Sampling parameters: their one definition and their one validation.

Every edge that accepts them (the OpenAI HTTP API, the gRPC API, the SDK before it sends) builds
a SamplingParams through `SamplingParams.checked` (or calls `validate`) so a bad value is refused
with the same message everywhere, and nothing that reaches the engine or a worker can raise there.
What the HTTP API takes besides (stop strings) is checked here too (`check_stop_strings`,
and `check_penalty` for a penalty checked on its own), so every bound lives in this one module.

Invariants of a validated SamplingParams (what a worker may rely on):
- max_tokens in [1, MAX_TOKENS];
- temperature finite: 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE], so logits /
  temperature never overflows float32 (a denormal such as 1e-40 would);
- top_p in (0, 1]; top_k in [0, MAX_TOP_K] (0 = off);
- seed None or in [0, 2**63): what torch.Generator.manual_seed and the uint64 proto take alike;
- at most MAX_STOP_TOKEN_IDS stop ids, each in [0, MAX_TOKEN_ID];
- logprobs None (off) or in [0, MAX_LOGPROBS]: the sampled token's logprob plus that many of the
  most likely alternatives;
- presence_penalty and frequency_penalty in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's, neutral 0);
  repetition_penalty in [MIN_REPETITION_PENALTY, 1 + MAX_PENALTY] (vLLM's / HF's, neutral 1),
  so dividing a logit by it never overflows float32;
- min_tokens in [0, max_tokens].

Every default is neutral: a SamplingParams built without the newer fields samples as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MAX_TOKENS = 2**31 - 1  # scheduler.proto int32
MIN_TEMPERATURE = 1e-3  # below it (and above 0) is refused: use 0 for greedy
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1
MAX_TOP_K = 2**31 - 1  # scheduler.proto int32 (worker.proto uint32)
MAX_TOKEN_ID = 2**32 - 1  # proto uint32
MAX_STOP_TOKEN_IDS = 64
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_STRING_CHARS = 256  # each stop string; the text stream searches and holds back this much
MAX_PENALTY = 2.0  # OpenAI's presence / frequency penalties are in [-2, 2]
MIN_REPETITION_PENALTY = 1e-2  # > 0 as vLLM asks; bounded away from 0 so logit / it is finite
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit (vLLM's default max_logprobs too)


class InvalidSampling(ValueError):
    """A sampling parameter out of range; `field` names it (an OpenAI 400's `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; N = the sampled token's logprob + top N
    presence_penalty: float = 0.0  # OpenAI: minus this for each token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count so far
    repetition_penalty: float = 1.0  # vLLM / HF: prompt and output tokens' logits scaled
    min_tokens: int = 0  # EOS and stop_token_ids masked until this many tokens are out

    @property
    def penalized(self) -> bool:
        """Some penalty is on: sampling needs the request's tokens so far."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def needs_prompt_len(self) -> bool:
        """Sampling needs to know the prompt length (to tell outputs from prompt)."""
        return self.min_tokens > 0 or self.penalized

    @property
    def processed(self) -> bool:
        """More than picking a token: penalties, min_tokens or logprobs."""
        return self.logprobs is not None or self.needs_prompt_len

    def validate(self) -> None:
        """Raise InvalidSampling naming the first bad field."""
        if not _is_int(self.max_tokens):
            raise InvalidSampling(
                "max_tokens", f"max_tokens must be an integer ({self.max_tokens!r})"
            )
        if self.max_tokens <= 0:
            raise InvalidSampling("max_tokens", f"max_tokens must be > 0 (got {self.max_tokens})")
        if self.max_tokens > MAX_TOKENS:
            raise InvalidSampling(
                "max_tokens", f"max_tokens must be <= {MAX_TOKENS} (got {self.max_tokens})"
            )
        self._check_temperature()
        if not (_is_number(self.top_p) and math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidSampling("top_p", f"top_p must be in (0, 1] (got {self.top_p})")
        if not (_is_int(self.top_k) and 0 <= self.top_k <= MAX_TOP_K):
            raise InvalidSampling("top_k", f"top_k must be in [0, {MAX_TOP_K}] (got {self.top_k})")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise InvalidSampling("seed", f"seed must be in [0, 2**63) (got {self.seed})")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidSampling(
                "stop_token_ids",
                f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids "
                f"(got {len(self.stop_token_ids)})",
            )
        for t in self.stop_token_ids:
            if not (_is_int(t) and 0 <= t <= MAX_TOKEN_ID):
                raise InvalidSampling("stop_token_ids", f"stop_token_ids: {t} is not a token id")
        self._check_extras()

    def _check_extras(self) -> None:
        lp = self.logprobs
        if lp is not None and not (_is_int(lp) and 0 <= lp <= MAX_LOGPROBS):
            raise InvalidSampling("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}] (got {lp})")
        check_penalty("presence_penalty", self.presence_penalty, 0.0)
        check_penalty("frequency_penalty", self.frequency_penalty, 0.0)
        check_penalty("repetition_penalty", self.repetition_penalty, 1.0)
        m = self.min_tokens
        if not (_is_int(m) and 0 <= m <= self.max_tokens):
            raise InvalidSampling(
                "min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}] (got {m})"
            )

    def _check_temperature(self) -> None:
        t = self.temperature
        ok = _is_number(t) and math.isfinite(t)
        if ok and t != 0:
            ok = MIN_TEMPERATURE <= t <= MAX_TEMPERATURE
        if not ok:
            raise InvalidSampling(
                "temperature",
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                f"{MAX_TEMPERATURE:g}] (got {t})",
            )

    @classmethod
    def checked(cls, **fields) -> SamplingParams:
        """Build and validate: the constructor every API edge uses."""
        fields["stop_token_ids"] = tuple(fields.get("stop_token_ids") or ())
        params = cls(**fields)
        params.validate()
        return params


def check_stop_strings(stop: Sequence[str]) -> tuple[str, ...]:
    """OpenAI's `stop`: at most MAX_STOP_STRINGS strings of at most MAX_STOP_STRING_CHARS
    characters each; returns the non-empty ones. Raises InvalidSampling("stop", ...)."""
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidSampling(
            "stop", f"stop takes at most {MAX_STOP_STRINGS} strings (got {len(stop)})"
        )
    for s in stop:
        if len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidSampling(
                "stop",
                f"a stop string has at most {MAX_STOP_STRING_CHARS} characters (got {len(s)})",
            )
    return tuple(s for s in stop if s)


def check_penalty(field: str, value: float | None, neutral: float) -> None:
    """A penalty's bounds: OpenAI's `presence_penalty` / `frequency_penalty` (neutral 0) in
    [-MAX_PENALTY, MAX_PENALTY], vLLM's `repetition_penalty` (neutral 1) in
    [MIN_REPETITION_PENALTY, 1 + MAX_PENALTY]. None (absent) passes. Raises InvalidSampling
    naming `field` for a non-finite or out-of-range value; `validate` checks the fields with it."""
    if value is None:
        return
    if not (_is_number(value) and math.isfinite(value)):
        raise InvalidSampling(field, f"{field} must be a finite number (got {value})")
    low, high = neutral - MAX_PENALTY, neutral + MAX_PENALTY
    if neutral > 0:  # a multiplicative penalty: it must stay positive
        low = MIN_REPETITION_PENALTY
    if not low <= value <= high:
        raise InvalidSampling(field, f"{field} must be in [{low:g}, {high:g}] (got {value})")
