"""Request fields this server declares but does not do, and the bounds of `n` and `priority`
(and why `priority` is not an SLO class).

A field OpenAI defines that we cannot honour is a 400 naming it whenever it asks for something
(a non-empty `tools`, `response_format` json_schema, `best_of` 3, ...): silently ignoring it
would hand the client a different answer than it asked for. Its neutral value (null, empty,
`tool_choice` "none", `modalities` ["text"], `best_of` 1, ...) is accepted, since clients and
SDKs send those by default. Fields that are not OpenAI's or vLLM's at all never get this far:
the body models forbid them (bodies.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .bodies import ChatRequest, CompletionRequest, SamplingFields
from .edge import BadRequest

MAX_N = 16  # choices per request: n engine requests, each holding its own KV cache
MAX_PRIORITY = 2**31 - 1  # |priority|: what an int32 field (proto, vLLM's scheduler) carries

# A rule: a field's value -> why it is refused, or None when it is acceptable.
Rule = Callable[[Any], str | None]


def _unset(why: str) -> Rule:
    """Refused unless null / false / empty."""
    return lambda v: None if not v else why


def _absent(why: str) -> Rule:
    """Refused unless null: even an empty object asks for the feature (web search, say)."""
    return lambda v: None if v is None else why


def _one_of(allowed: tuple, why: str) -> Rule:
    def rule(v: Any) -> str | None:
        return None if v is None or v in allowed else f"{_short(v)} is not supported: {why}"

    return rule


def _short(v: Any) -> str:
    """A client's value in a message, bounded (it may be long)."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


_TOOLS = "tool calling is not supported"

COMMON: dict[str, Rule] = {
    "logit_bias": _unset("logit_bias is not supported (the sampler applies no bias)"),
    "store": _unset("store=true (stored completions) is not supported"),
    "service_tier": _one_of(("auto", "default"), "only 'auto' or 'default'"),
}

CHAT: dict[str, Rule] = {
    "tools": _unset(_TOOLS),
    "tool_choice": _one_of(("none",), _TOOLS),
    "functions": _unset(_TOOLS),
    "function_call": _one_of(("none",), _TOOLS),
    "parallel_tool_calls": _absent(_TOOLS),
    "audio": _absent("audio output is not supported"),
    "modalities": lambda v: (
        None if not v or set(v) <= {"text"} else "only the 'text' modality is supported"
    ),
    "prediction": _absent("predicted outputs are not supported"),
    "reasoning_effort": _one_of(("none",), "not a reasoning model (only 'none')"),
    "verbosity": _one_of(("medium",), "only 'medium' (the default)"),
    "web_search_options": _absent("web search is not supported"),
    "moderation": _absent("moderation is not supported"),
    "response_format": lambda v: (
        None
        if v is None or v.type == "text"
        else f"response_format type {_short(v.type)} is not supported: only 'text' "
        "(no structured output)"
    ),
}

COMPLETIONS: dict[str, Rule] = {
    "best_of": _one_of((1,), "best_of > 1 (server-side best-of) is not supported"),
    "echo": _unset("echo=true is not supported"),
    "suffix": _unset("suffix (insertion) is not supported"),
}


def refuse_unsupported(body: SamplingFields) -> None:
    """Raise BadRequest naming the first field that asks for something we do not do."""
    rules = dict(COMMON)
    if isinstance(body, ChatRequest):
        rules |= CHAT
    if isinstance(body, CompletionRequest):
        rules |= COMPLETIONS
    for field, rule in rules.items():
        why = rule(getattr(body, field))
        if why is not None:
            raise BadRequest(why if field in why else f"{field}: {why}", field)


def n_of(body: SamplingFields) -> int:
    """`n` (null: 1), in [1, MAX_N]."""
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise BadRequest(f"n must be in [1, {MAX_N}] (got {n})", "n")
    return n


def priority_of(body: SamplingFields) -> int:
    """vLLM's `priority` (null: 0), bounded; anything but 0 is refused, as vLLM refuses one
    when its priority scheduling is off. It is not mapped onto SLO classes: vLLM's priority is
    a strict rank (lower runs first, and preempts), while the ecoserve policy orders by SLO
    slack; a priority turned into some class's latency targets would be neither, a different
    answer than the client asked for. Latency is asked for with the `ecoserve` object."""
    p = 0 if body.priority is None else body.priority
    if abs(p) > MAX_PRIORITY:
        raise BadRequest(f"priority must be in [-2**31+1, 2**31-1] (got {p})", "priority")
    if p != 0:
        raise BadRequest(
            "priority scheduling is not supported (priority must be 0); ask for latency with "
            "the ecoserve object: slo_class, ttft_ms, tpot_ms, deadline_ms",
            "priority",
        )
    return p


def include_usage(body: SamplingFields) -> tuple[bool, bool]:
    """(a last usage chunk, usage on every chunk): `stream_options.include_usage`, and vLLM's
    `continuous_usage_stats`, which counts only with include_usage (as in vLLM). Accepted on a
    request that does not stream, where they change nothing (a whole response has usage)."""
    options = body.stream_options
    last = bool(options and options.include_usage)
    return last, last and bool(options and options.continuous_usage_stats)


def logprobs_of(body: SamplingFields) -> int | None:
    """How many top alternatives per token a body asks for, None for no logprobs at all.
    Chat: `logprobs: true` with `top_logprobs` (0..20; given without logprobs it is a 400, as
    OpenAI's). Completions: `logprobs` is that number itself (OpenAI allows 5, vLLM 20: 20)."""
    if isinstance(body, ChatRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs set to true", "top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    return getattr(body, "logprobs", None)
