"""Every OpenAI request and response body the HTTP API speaks, as pydantic models.

Requests accept OpenAI's fields plus vLLM's extensions (`top_k`, `stop_token_ids`,
`ignore_eos`, `repetition_penalty`); unknown fields are ignored, as OpenAI's clients send some we
do not use. Types are checked here; ranges in one place, ecoserve_common.sampling (a body's size
is bounded before it is parsed: edge.py).
Responses are built here and dumped as JSON, so a route never hand-writes a body.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

# ---- requests ------------------------------------------------------------------------------


class SamplingFields(BaseModel):
    """What completions and chat share: the sampling knobs and the call's options."""

    model: str = ""
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extension
    seed: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension
    n: int = 1
    user: str | None = None
    # Accepted so OpenAI's clients can send their neutral values; any other is a 400 (the
    # sampler applies no penalties), see ecoserve_common.sampling.check_penalty.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's extension


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


# ---- responses -----------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = str | None  # stop, length, error (a failure), aborted


class _Response(BaseModel):
    id: str  # the request id: the store's key, the log field, the metrics label
    created: int  # wall-clock seconds (a reporting edge)
    model: str
    usage: Usage | None = None  # on a whole response, and on a stream's last chunk

    def body(self) -> dict[str, Any]:
        """The JSON body: `usage` only where it is set, every other field always."""
        return self.model_dump(exclude={"usage"} if self.usage is None else None)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason = None


class Completion(_Response):
    """A whole completion, or one streamed chunk of one (OpenAI uses the same object)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: FinishReason = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDeltaChoice(BaseModel):
    index: int = 0
    delta: ChatMessageOut
    finish_reason: FinishReason = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatDeltaChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ecoserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, authentication_error, rate_limit_error, timeout
    param: str | None = None  # the request field at fault, where one is
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
