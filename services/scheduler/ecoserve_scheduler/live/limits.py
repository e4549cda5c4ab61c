"""What one request may be, checked before it reaches the engine: the API's limits, the refusal
an edge turns into its own error (HTTP 4xx / a gRPC status), and the prompt checks (text or
token ids, not both; non-empty; within the character, context and vocabulary limits)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CHARS_PER_TOKEN_LIMIT = 32  # a text prompt over this many characters per context token is refused


@dataclass(frozen=True)
class ApiLimits:
    max_model_len: int = 4096  # prompt + max_tokens
    max_pending: int = 1024  # requests in the system before new ones are refused
    vocab_size: int | None = None  # token ids must be below it when known
    # Characters of a text prompt, checked before it is tokenized; None: the model's context
    # times CHARS_PER_TOKEN_LIMIT (far above any real text's few characters per token).
    max_prompt_chars: int | None = None
    # False: with no worker registered a request is refused at once ("unavailable": HTTP 503,
    # gRPC UNAVAILABLE) instead of waiting silently for one; True: it is queued until one comes.
    queue_without_workers: bool = False

    @property
    def prompt_chars(self) -> int:
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return self.max_model_len * CHARS_PER_TOKEN_LIMIT


class Rejected(Exception):
    """A request refused before it ran: code "invalid", "exhausted", "unavailable" (no worker)
    or "exists"; `param` names
    the request field at fault where one is (an OpenAI 400's `param`)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def prompt_ids(limits: ApiLimits, tokenizer, text: str, ids: Sequence[int]) -> list[int]:
    """The prompt's token ids: `ids` checked, or `text` checked and tokenized. Raises
    Rejected("invalid", ..., "prompt")."""
    if text and ids:
        raise Rejected("invalid", "give prompt or prompt_token_ids, not both", "prompt")
    if ids:
        if len(ids) > limits.max_model_len:
            raise Rejected(
                "invalid",
                f"prompt ({len(ids)} tokens) exceeds the model's {limits.max_model_len}",
                "prompt",
            )
        out = [int(t) for t in ids]
        vocab = limits.vocab_size
        if vocab is not None and (max(out) >= vocab or min(out) < 0):
            raise Rejected("invalid", f"token ids must be in [0, {vocab})", "prompt")
        return out
    if not text.strip():
        raise Rejected("invalid", "empty prompt", "prompt")
    if len(text) > limits.prompt_chars:
        raise Rejected(
            "invalid", f"prompt has {len(text)} characters; at most {limits.prompt_chars}", "prompt"
        )
    return tokenizer.encode(text)


def length_problem(limits: ApiLimits, prompt_len: int, max_tokens: int) -> str | None:
    """Why prompt + max_tokens does not fit the context, or None."""
    if prompt_len + max_tokens > limits.max_model_len:
        return (
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
            f"{limits.max_model_len}"
        )
    return None
