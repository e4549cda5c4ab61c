"""POST /v1/completions: a prompt (text, one text in a list, or token ids) to a completion, n
times over with `n`."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ecoserve_common.ids import new_request_id

from ..frontend import GenerateParams
from .bodies import CompletionRequest
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
from .schemas import CompletionReply

router = APIRouter()


def prompt_of(body: CompletionRequest) -> tuple[str, tuple[int, ...]]:
    """(text, token ids): one of them is empty."""
    prompt = body.prompt
    if not isinstance(prompt, list):
        return prompt, ()
    if prompt and all(isinstance(x, str) for x in prompt):
        if len(prompt) != 1:
            raise BadRequest("one prompt per request", "prompt")
        return prompt[0], ()
    return "", tuple(prompt)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, ctx: Ctx):
    rid, created = new_request_id("cmpl-"), int(time.time())
    received = ctx.frontend.clock()  # its SLO's TTFT and deadline count from here
    if (missing := unknown_model(ctx, body.model)) is not None:
        return missing
    try:
        refuse_unsupported(body)
        text, ids = prompt_of(body)
        options = options_of(body)
        stop = stops_of(body)
        slo = slo_of(ctx, body)
        sampling = sampling_of(body, body.max_tokens)
    except BadRequest as e:
        return error(400, e.message, param=e.param)
    params = GenerateParams(
        prompt=text,
        prompt_token_ids=ids,
        sampling=sampling,
        request_id=rid,
        stop=stop,
        slo=slo,
        received_s=received,
    )
    asked = sampling.logprobs is not None
    reply = CompletionReply(
        rid, created, ctx.model_id, LogprobText(ctx.tokenizer) if asked else None
    )
    return await generate(ctx, lambda: params, reply, options, request)
