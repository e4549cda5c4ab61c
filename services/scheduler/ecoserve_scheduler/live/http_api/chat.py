"""POST /v1/chat/completions: messages (content parts, roles: messages.py) rendered with the
model's chat template (or, for a model without one, a plain "role: content" transcript) and
completed as the assistant's turn, n times over with `n`."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ecoserve_common.ids import new_request_id

from ..frontend import GenerateParams
from .bodies import ChatRequest
from .edge import BadRequest
from .fields import refuse_unsupported
from .generation import (
    Ctx,
    error,
    generate,
    options_of,
    sampling_of,
    slo_of,
    stops_of,
    unknown_model,
)
from .logprobs import LogprobText
from .messages import answer_lengths, check_size, render, template_messages
from .schemas import ChatReply

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request, ctx: Ctx):
    rid, created = new_request_id("chatcmpl-"), int(time.time())
    received = ctx.frontend.clock()  # its SLO's TTFT and deadline count from here
    if (missing := unknown_model(ctx, body.model)) is not None:
        return missing
    # OpenAI's chat has no default cap: without one, the room the context leaves (vLLM's).
    cap = body.max_completion_tokens
    if cap is None and "max_tokens" in body.model_fields_set:
        cap = body.max_tokens
    try:
        refuse_unsupported(body)
        messages = template_messages(body, getattr(ctx.tokenizer, "chat_template", None))
        check_size(messages, ctx.frontend.limits.prompt_chars)
        options = options_of(body)
        stop = stops_of(body)
        slo = slo_of(ctx, body)
        limit = ctx.frontend.limits.max_model_len
        sampling = sampling_of(body, limit if cap is None else cap)
    except BadRequest as e:
        return error(400, e.message, param=e.param)

    def build() -> GenerateParams:
        prompt = render(ctx.tokenizer, messages)
        return GenerateParams(
            prompt=prompt,
            history=answer_lengths(ctx.tokenizer, messages),
            sampling=sampling,
            request_id=rid,
            stop=stop,
            fill_context=cap is None,
            slo=slo,
            received_s=received,
        )

    asked = sampling.logprobs is not None
    reply = ChatReply(rid, created, ctx.model_id, LogprobText(ctx.tokenizer) if asked else None)
    return await generate(ctx, build, reply, options, request)
