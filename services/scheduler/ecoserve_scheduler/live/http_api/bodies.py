"""Every request body the HTTP API takes, as pydantic models.

Each body declares every field of OpenAI's published request schema (openai-python's
`completion_create_params` / `chat.completion_create_params`) plus vLLM's extensions that
vLLM's users send (`top_k`, `stop_token_ids`, `ignore_eos`, `repetition_penalty`,
`min_tokens`, `priority`) and our own `ecoserve` object (the latency SLO). A field that is in
none of these is a 400 naming it ("unrecognized request argument", as OpenAI answers), never
ignored: a client that asks for something this server does not do learns it at once instead of
getting a silently different answer. Declared fields that we
do not support at all (tools, audio, structured output, ...) are typed here and refused with a
reason when set to anything but their neutral value (fields.py); harmless metadata (`user`,
`metadata`, `store` false, `service_tier` auto/default, `stream_options`, the prompt-cache hints,
`safety_identifier`) is accepted.

Types are checked here; ranges in one place, ecoserve_common.sampling and fields.py (a body's
size is bounded before it is parsed: edge.py). Most fields take null too, as OpenAI's do: null
means the default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Json = dict[str, Any]


class _Body(BaseModel):
    """A field not declared is a 400 naming it (app._bad_request)."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool | None = None  # a last chunk with `choices: []` and the usage
    # OpenAI pads deltas against length side channels; this server sends no padding either way.
    include_obfuscation: bool | None = None
    # vLLM's (guidellm sends it): with include_usage, usage on every chunk too, its choice's
    # completion tokens so far.
    continuous_usage_stats: bool | None = None


class ResponseFormat(BaseModel):
    """`{"type": "text"}` is accepted; the others (json_object, json_schema: its schema rides
    along, hence extra fields allowed) are refused by type in fields.py."""

    model_config = ConfigDict(extra="allow")
    type: str


class EcoserveFields(_Body):
    """The `ecoserve` object: this server's own request options (OpenAI clients send it with
    `extra_body={"ecoserve": {...}}`). The latency SLO: a class the server configures, and/or
    explicit targets in milliseconds that override the class's (live/slo.py); a request that
    gives none gets the server's default class. Ranges and class names: generation.slo_of."""

    slo_class: str | None = None
    ttft_ms: int | None = None
    tpot_ms: int | None = None
    deadline_ms: int | None = None


class SamplingFields(_Body):
    """What completions and chat share: the sampling knobs and the call's options."""

    model: str = ""
    max_tokens: int | None = 16
    temperature: float | None = None  # null: 1, OpenAI's default
    top_p: float | None = None  # null or 0: no nucleus cut
    seed: int | None = None  # with n > 1, choice i samples with seed + i
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int | None = 1  # choices per request: fields.MAX_N at most
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # true (OpenAI's stored completions) is refused
    service_tier: str | None = None  # auto / default only
    logit_bias: dict[str, float] | None = None  # refused unless empty
    # OpenAI's penalties; only their neutral value until the sampler applies them
    # (ecoserve_common.sampling.check_penalty).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM's extensions
    top_k: int | None = None  # null, 0 or -1 (vLLM's "off"): no top-k cut
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    priority: int | None = None  # vLLM's: lower runs first (fields.priority_of)
    # ours: the latency SLO (EcoserveFields)
    ecoserve: EcoserveFields | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None  # completions: how many top log-probabilities per token
    # OpenAI's, refused when set (fields.py): no server-side best-of, echo or insertion.
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    """One part of a message's `content` list. Only `{"type": "text", "text": ...}` is
    served; other types (image_url, input_audio, file, refusal) carry their own fields, so
    extra fields are allowed here and the type is refused by name (messages.py)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Body):
    # "tool" / "function" are OpenAI roles, accepted by the schema so the refusal can say why
    # (messages.py: no tool calling).
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None  # null / absent: assistant messages only
    name: str | None = None  # handed to the template, which may use it
    # An assistant turn's tool calls, audio or refusal, a tool result's id: refused when set.
    refusal: str | None = None
    tool_calls: list[Json] | None = None
    function_call: Json | None = None
    audio: Json | None = None
    tool_call_id: str | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    # OpenAI's, refused when set to anything but their neutral value (fields.py).
    tools: list[Json] | None = None
    tool_choice: str | Json | None = None
    functions: list[Json] | None = None
    function_call: str | Json | None = None
    parallel_tool_calls: bool | None = None
    audio: Json | None = None
    modalities: list[str] | None = None
    prediction: Json | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Json | None = None
    moderation: Json | None = None
    # Hints and ids with no effect on the answer: accepted.
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: Json | None = None
    safety_identifier: str | None = None
