"""`n` choices of one request: n engine requests for the same prompt.

- Admission counts all n: n places are reserved at once on the event loop (each one atomic;
  if any is refused the others are given back and the request is a 429), so a request with n
  choices can never push the system past `max_pending`.
- The prompt is built (chat template) and tokenized once; each choice is then submitted with
  those token ids. The prefill is not shared: there is no prefix cache yet, so each choice
  computes the prompt's KV cache itself (n prefills).
- Choice i has request id `<id>` for i = 0 (the response's `id`, as with n = 1) and `<id>-<i>`
  after, each its own store row; with a `seed`, choice i samples with seed + i (mod 2**63), so
  the n choices are n different samples that the same seed reproduces. Without a seed each
  choice draws its own.
- A choice that cannot start (say its sampling is refused) aborts the ones already started;
  a client gone while they start has every started one aborted.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from ecoserve_common.sampling import MAX_SEED

from ..engine import RequestHandle
from ..frontend import Admission, Frontend, GenerateParams, Rejected


@dataclass(frozen=True)
class Started:
    params: list[GenerateParams]  # what each choice was started with
    handles: list[RequestHandle]
    prompt_len: int  # the prompt's tokens (once: the choices share the prompt)


def admit(frontend: Frontend, n: int) -> list[Admission]:
    """Room for n requests, or Rejected with none held."""
    held: list[Admission] = []
    try:
        for _ in range(n):
            held.append(frontend.admit())
    except Rejected:
        for a in held:
            a.release()
        raise
    return held


def choice_params(params: GenerateParams, n: int, ids: tuple[int, ...]) -> list[GenerateParams]:
    """The n choices' GenerateParams: `ids` the prompt's tokens, ids and seeds as above."""
    out = []
    for i in range(n):
        sampling = params.sampling
        if sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + i) % (MAX_SEED + 1))
        rid = params.request_id if i == 0 else f"{params.request_id}-{i}"
        out.append(
            dataclasses.replace(
                params, prompt="", prompt_token_ids=ids, sampling=sampling, request_id=rid
            )
        )
    return out


def start_all(
    frontend: Frontend, build: Callable[[], GenerateParams], admissions: list[Admission]
) -> Started:
    """Build the prompt and start one request per admission (in the app's pool: templates and
    tokenizers take time). Every admission is released however it ends."""
    try:
        params = build()
        if len(admissions) == 1:
            handle, prompt_len = frontend.start(params, admissions[0])
            return Started([params], [handle], prompt_len)
        # Tokenized once, with the Frontend's own checks (empty, too many characters, token ids
        # out of range); Frontend.start then checks the length again per choice.
        ids = tuple(frontend.prompt_ids(params))
        each = choice_params(params, len(admissions), ids)
        handles: list[RequestHandle] = []
        try:
            for p, a in zip(each, admissions, strict=True):
                handles.append(frontend.start(p, a)[0])
        except BaseException:
            abort(frontend, handles)
            raise
        return Started(each, handles, len(ids))
    finally:
        for a in admissions:
            a.release()


def abort(frontend: Frontend, handles: list[RequestHandle]) -> None:
    """End started requests nobody will read: aborted in the engine, recorded so."""
    for h in handles:
        frontend.following(h).close()


async def start(
    frontend: Frontend,
    pool,
    build: Callable[[], GenerateParams],
    admissions: list[Admission],
) -> Started:
    """`start_all` in `pool`. If the caller is cancelled meanwhile (the client left), requests
    that started anyway are aborted."""
    future = pool.submit(start_all, frontend, build, admissions)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if future.cancelled():
            for a in admissions:
                a.release()  # it never ran
        else:
            future.add_done_callback(lambda done: _abort_started(frontend, done))
        raise


def _abort_started(frontend: Frontend, done: Future) -> None:
    if not done.cancelled() and done.exception() is None:
        abort(frontend, done.result().handles)
