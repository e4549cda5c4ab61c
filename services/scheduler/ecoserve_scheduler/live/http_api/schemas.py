"""Every response body the HTTP API sends, as pydantic models, and the two reply shapes
(`CompletionReply`, `ChatReply`) that build them, so a route never hand-writes a body. Request
bodies are in bodies.py.

Streams follow OpenAI's: a chunk per piece of text, `choices` holding the one choice it belongs
to (with its `index`); in chat the first delta of each choice carries `"role": "assistant"` and
later ones only `content`; the chunk that ends a choice carries its finish_reason. `usage` is
only there when the request asked for it (`stream_options.include_usage`): then every chunk has
`"usage": null` and one last chunk has `"choices": []` and the usage, before `[DONE]` (with vLLM's
`continuous_usage_stats` too, every chunk has its choice's usage so far). A whole response always
carries usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from .logprobs import LogprobText


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
    usage: Usage | None = None

    def body(self, usage_key: bool = True) -> dict[str, Any]:
        """The JSON body. `usage_key` False leaves out a null `usage` (a stream that did not ask
        for usage has no such key, as OpenAI's has not)."""
        drop = {"usage"} if self.usage is None and not usage_key else None
        return self.model_dump(exclude=drop)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict[str, Any] | None = None  # only where the request asked (logprobs.py)
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
    logprobs: dict[str, Any] | None = None  # only where the request asked (logprobs.py)
    finish_reason: FinishReason = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(BaseModel):
    """A streamed delta: `role` only in a choice's first one (dumped without it after)."""

    role: Literal["assistant"] | None = None
    content: str


class ChatDeltaChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None  # only where the request asked (logprobs.py)
    finish_reason: FinishReason = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatDeltaChoice]

    def body(self, usage_key: bool = True) -> dict[str, Any]:
        out = super().body(usage_key)
        for choice in out["choices"]:
            if choice["delta"]["role"] is None:
                del choice["delta"]["role"]
        return out


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


# ---- reply shapes: what generation.py calls to build bodies ----------------------------------

Outcome = tuple[str, FinishReason, list]  # one choice's text, finish reason, TokenLogprobs


@dataclass(frozen=True)
class CompletionReply:
    id: str
    created: int
    model: str
    logprobs: LogprobText | None = None  # None: the request asked for no logprobs

    def _head(self, usage: Usage | None) -> dict[str, Any]:
        return dict(id=self.id, created=self.created, model=self.model, usage=usage)

    def _logprobs(self, index: int, lps: list) -> dict[str, Any] | None:
        return None if self.logprobs is None else self.logprobs.completion(index, lps)

    def whole(self, outcomes: list[Outcome], usage: Usage) -> dict[str, Any]:
        choices = [
            CompletionChoice(
                index=i, text=text, finish_reason=finish, logprobs=self._logprobs(i, lps)
            )
            for i, (text, finish, lps) in enumerate(outcomes)
        ]
        return Completion(**self._head(usage), choices=choices).body()

    def chunk(
        self,
        index: int,
        text: str,
        finish: FinishReason,
        first: bool,
        usage_key: bool,
        usage: Usage | None = None,
        logprobs: list | None = None,
    ) -> dict[str, Any]:
        """One streamed chunk of choice `index`; `usage_key`: a null `usage` is sent (the
        request asked for usage), `usage`: this chunk's (vLLM's continuous usage),
        `logprobs`: those of the tokens this chunk adds."""
        lps = self._logprobs(index, logprobs or [])
        choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=lps)
        return Completion(**self._head(usage), choices=[choice]).body(usage_key)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return Completion(**self._head(usage), choices=[]).body()


@dataclass(frozen=True)
class ChatReply(CompletionReply):
    def _logprobs(self, index: int, lps: list) -> dict[str, Any] | None:
        return None if self.logprobs is None else self.logprobs.chat(lps)

    def whole(self, outcomes: list[Outcome], usage: Usage) -> dict[str, Any]:
        choices = [
            ChatChoice(
                index=i,
                message=ChatMessageOut(content=text),
                finish_reason=finish,
                logprobs=self._logprobs(i, lps),
            )
            for i, (text, finish, lps) in enumerate(outcomes)
        ]
        return ChatCompletion(**self._head(usage), choices=choices).body()

    def chunk(
        self,
        index: int,
        text: str,
        finish: FinishReason,
        first: bool,
        usage_key: bool,
        usage: Usage | None = None,
        logprobs: list | None = None,
    ) -> dict[str, Any]:
        delta = ChatDelta(role="assistant" if first else None, content=text)
        lps = self._logprobs(index, logprobs or [])
        choice = ChatDeltaChoice(index=index, delta=delta, finish_reason=finish, logprobs=lps)
        return ChatCompletionChunk(**self._head(usage), choices=[choice]).body(usage_key)

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return ChatCompletionChunk(**self._head(usage), choices=[]).body()


Reply = CompletionReply  # ChatReply is one too
