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


def prompt_of(tokenizer, body: ChatRequest) -> str:
    messages = [m.model_dump() for m in body.messages]
    if not messages:
        raise BadRequest("messages is empty", "messages")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request, ctx: Ctx):
    rid, created = new_request_id("chatcmpl-"), int(time.time())
    if (missing := unknown_model(ctx, body.model)) is not None:
        return missing
    try:
        prompt = prompt_of(ctx.tokenizer, body)
        stop = stops_of(body)
        sampling = sampling_of(body, body.max_completion_tokens or body.max_tokens)
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

    params = GenerateParams(prompt=prompt, sampling=sampling, request_id=rid, stop=stop)
    return await generate(ctx, params, render, body.stream, request)
