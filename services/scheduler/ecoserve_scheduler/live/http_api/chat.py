"""POST /v1/chat/completions: messages rendered with the model's chat template (or, for a model
without one, a plain "role: content" transcript) and completed as the assistant's turn."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ecoserve_common.ids import new_request_id

from ..frontend import GenerateParams
from .generation import (
    BadRequest,
    Ctx,
    error,
    finish_of,
    generate,
    sampling_of,
    stops_of,
    unknown_model,
)
from .schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDeltaChoice,
    ChatMessageOut,
    ChatRequest,
    Usage,
)

router = APIRouter()


def check_size(body: ChatRequest, max_chars: int) -> None:
    """Refuse what the prompt limit would refuse anyway, before a template renders it."""
    if not body.messages:
        raise BadRequest("messages is empty", "messages")
    chars = sum(len(m.content) for m in body.messages)
    if chars > max_chars:
        raise BadRequest(f"messages have {chars} characters; at most {max_chars}", "messages")


def prompt_of(tokenizer, body: ChatRequest) -> str:
    """The prompt text (runs in the app's pool: a template can be slow). A template that
    refuses the messages (e.g. roles that do not alternate) is a 400 naming `messages`."""
    messages = [m.model_dump() for m in body.messages]
    if not messages:
        raise BadRequest("messages is empty", "messages")
    if not getattr(tokenizer, "chat_template", None):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own raise_exception, or a template error
        message = (str(e).splitlines() or [""])[0][:300]
        raise BadRequest(f"the chat template refused the messages: {message}", "messages") from e


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request, ctx: Ctx):
    rid, created = new_request_id("chatcmpl-"), int(time.time())
    if (missing := unknown_model(ctx, body.model)) is not None:
        return missing
    cap = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    try:
        check_size(body, ctx.frontend.limits.prompt_chars)
        stop = stops_of(body)
        sampling = sampling_of(body, cap)
    except BadRequest as e:
        return error(400, e.message, param=e.param)

    def render(out: str, reason: str | None, stream: bool, usage: Usage | None) -> dict:
        message, finish = ChatMessageOut(content=out), finish_of(reason)
        head = dict(id=rid, created=created, model=ctx.model_id, usage=usage)
        if stream:
            delta = ChatDeltaChoice(delta=message, finish_reason=finish)
            return ChatCompletionChunk(**head, choices=[delta]).body()
        return ChatCompletion(
            **head, choices=[ChatChoice(message=message, finish_reason=finish)]
        ).body()

    def build() -> GenerateParams:
        prompt = prompt_of(ctx.tokenizer, body)
        return GenerateParams(prompt=prompt, sampling=sampling, request_id=rid, stop=stop)

    return await generate(ctx, build, render, body.stream, request)
