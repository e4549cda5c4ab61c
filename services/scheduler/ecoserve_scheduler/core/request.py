"""A request as the scheduler core sees it: lengths, prediction, SLO and progress.

Pure data plus a few derived properties. The core never reads a clock: every time value here was
passed in by a shell (the live runtime or the simulator).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ecoserve_common.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # in the prompt-task queue, holds no KV blocks
    RUNNING = "running"  # admitted: holds a reservation, prefilling or decoding
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def done(self) -> bool:
        return self in (Status.FINISHED, Status.FAILED, Status.ABORTED)


@dataclass(frozen=True)
class SLO:
    """Latency objectives. `jct_deadline_s` is absolute (same clock as `arrival_s`)."""

    jct_deadline_s: float = float("inf")
    ttft_s: float | None = None  # relative to arrival
    tpot_s: float | None = None


@dataclass(eq=False)  # identity semantics: two requests are never "equal"
class Request:
    request_id: str
    prompt_len: int
    arrival_s: float
    sampling: SamplingParams = field(default_factory=SamplingParams)
    slo: SLO = field(default_factory=SLO)
    prompt_token_ids: tuple[int, ...] | None = None  # None in the simulator: lengths only
    eos_token_id: int | None = None
    # Response-length prediction (tokens). `predicted_rl_upper` is the padded value reserved for.
    predicted_rl: int = 0
    predicted_rl_upper: int = 0

    # Progress, owned by the core.
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V is written in the cache
    output_cap: int = 0  # outputs at which it stops for length, set at admission
    worker_id: str | None = None
    admitted_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    finish_reason: str | None = None
    preemptions: int = 0
    extensions: int = 0
    # Running without a full reservation (overcommitted, or its tail taken by one): it grows by
    # what it needs, as vLLM's requests do, until preempted. Core-owned like the progress.
    on_demand: bool = False

    def __post_init__(self) -> None:
        if self.prompt_len <= 0:
            raise ValueError(f"request {self.request_id}: prompt_len must be > 0")
        if self.sampling.max_tokens <= 0:
            raise ValueError(f"request {self.request_id}: max_tokens must be > 0")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.prompt_len:
            raise ValueError(f"request {self.request_id}: prompt_len != len(prompt_token_ids)")

    @property
    def num_output(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens that must be in the cache before the next token can be sampled."""
        return self.prompt_len + self.num_output

    @property
    def pending(self) -> int:
        """Tokens to compute before the next sample: the whole prompt at first (plus all outputs
        after a recompute preemption), then 1 per decode step."""
        return self.num_tokens - self.num_computed

    def stops_at(self, token: int) -> bool:
        """`token`, its latest output, ends it: an EOS (unless ignore_eos) or a stop id. Not
        before min_tokens outputs came first: a worker masks both until then, so a stop is
        output min_tokens + 1 at the earliest, and a backend that does not mask (the
        simulator's) must not end the request earlier either."""
        sp = self.sampling
        if token == self.eos_token_id and not sp.ignore_eos or token in sp.stop_token_ids:
            return len(self.output_token_ids) > sp.min_tokens
        return False

    def token_ids(self, start: int, end: int) -> tuple[int, ...] | None:
        """Token ids at positions [start, end) of prompt + output, or None without prompt ids."""
        if self.prompt_token_ids is None:
            return None
        p = self.prompt_len
        if start >= p:  # decode fast path: outputs only
            return tuple(self.output_token_ids[start - p : end - p])
        return self.prompt_token_ids[start:end] + tuple(self.output_token_ids[: max(0, end - p)])
