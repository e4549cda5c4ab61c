"""What `SchedulerCore.update` / `schedule` / `abort` report: tokens, finishes, preemptions."""

from __future__ import annotations

from typing import NamedTuple

from ecoserve_common.plan import TokenLogprob

# ---- events returned by SchedulerCore.update / abort ------------------------------------------
# NamedTuples: update creates one TokenEvent per sequence per step, the hottest allocation.


class TokenEvent(NamedTuple):
    request_id: str
    token_id: int
    output_index: int  # 0 = first output token (not `index`: that is tuple.index)
    logprob: TokenLogprob | None = None  # when the request asked for logprobs


class FinishEvent(NamedTuple):
    request_id: str
    reason: str  # "stop", "length", "aborted", or "failed: <why>"


class PreemptEvent(NamedTuple):
    request_id: str
    reason: str


Event = TokenEvent | FinishEvent | PreemptEvent
