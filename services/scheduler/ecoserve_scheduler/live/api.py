"""The scheduler's gRPC client API (proto/scheduler.proto): a thin map onto the Frontend.

Rejected("invalid") is INVALID_ARGUMENT with the reason, "exhausted" is RESOURCE_EXHAUSTED
with a `retry-after-ms` trailer, "unavailable" (no worker registered) UNAVAILABLE with the
same trailer, "exists" is ALREADY_EXISTS; a passed deadline is
DEADLINE_EXCEEDED. A client that cancels the call aborts its request. A call without a deadline
waits as long as its request runs. Every path ends the request's store row terminal (the
Frontend's follow records the end however the call stops), and no status carries database or
Python internals: anything unexpected is INTERNAL "internal error", logged here.

Sampling parameters are built with `SamplingParams.checked`: a bad one is INVALID_ARGUMENT
whose details start with the field's name ("top_k: ..."); so are the SLO fields (`slo_class`,
`ttft_ms`, `tpot_ms`, `deadline_ms`: an unknown class, a target over a day: "ttft_ms: ...").
A request that sets `has_logprobs` gets each token's logprobs (`TokenLogprob`, one per token id)
in its chunks and response.
The request id is the caller's (checked with `check_request_id`: INVALID_ARGUMENT when
unusable) or minted here ("req-..."); it is the id of every chunk and response, the store's key
and GetRequest's argument.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import Iterator, Sequence

import grpc

from ecoserve_common.grpc_server import build_grpc_server
from ecoserve_common.ids import check_request_id, new_request_id
from ecoserve_common.pb import scheduler_pb2 as pb
from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc
from ecoserve_common.plan import TokenLogprob
from ecoserve_common.sampling import InvalidSampling, SamplingParams

from .frontend import RETRY_AFTER_S, Frontend, GenerateParams, Rejected
from .slo import SloAsk

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name
_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "exists": grpc.StatusCode.ALREADY_EXISTS,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


class SchedulerService(pb_grpc.SchedulerServicer):
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.tokenizer = frontend.tokenizer

    def Generate(self, request, context) -> Iterator[pb.GenerateChunk]:
        handle, _ = self._start(request, context)
        sent = 0  # tokens streamed so far: handle.logprobs[sent:] are the next ones'
        for tokens, finish in self._follow(handle, context):
            yield pb.GenerateChunk(
                request_id=handle.request_id,
                token_ids=tokens,
                text=self.tokenizer.decode(tokens) if tokens else "",
                finish_reason=finish or "",
                logprobs=logprobs_pb(handle.logprobs[sent : sent + len(tokens)]),
            )
            sent += len(tokens)

    def Complete(self, request, context) -> pb.CompleteResponse:
        handle, prompt_len = self._start(request, context)
        for _ in self._follow(handle, context):
            pass
        return pb.CompleteResponse(
            request_id=handle.request_id,
            token_ids=handle.tokens,
            text=self.tokenizer.decode(handle.tokens),
            finish_reason=handle.finish_reason or "",
            prompt_tokens=prompt_len,
            logprobs=logprobs_pb(handle.logprobs),
        )

    def Cancel(self, request, context) -> pb.CancelResponse:
        row = self._row(request.request_id, context)
        self.frontend.cancel(request.request_id)
        return pb.CancelResponse(found=row is not None and row.status in ("queued", "running"))

    def GetRequest(self, request, context) -> pb.RequestInfo:
        row = self._row(request.request_id, context)
        if row is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no request {request.request_id[:128]!r}")
        return pb.RequestInfo(
            request_id=row.request_id,
            status=row.status,
            prompt_tokens=row.prompt_tokens,
            response_tokens=row.response_tokens or 0,
            fail_reason=row.fail_reason or "",
            arrival_s=row.arrival_s,
            finished_s=row.finished_s or 0.0,
        )

    def Stats(self, request, context) -> pb.StatsResponse:
        snap = stats_of(self.frontend)
        return pb.StatsResponse(
            json=json.dumps(snap, sort_keys=True),
            pending=snap["pending"],
            workers=snap.get("workers", []),
        )

    def _row(self, request_id: str, context):
        """The request's store row (None without a store); UNAVAILABLE if the store fails."""
        store = self.frontend.store
        if store is None or check_request_id(request_id) is not None:
            return None
        try:
            return store.get(request_id)
        except Exception:
            log.exception("store read of %r failed", request_id)
            context.abort(grpc.StatusCode.UNAVAILABLE, "request store unavailable; retry")

    def _start(self, m: pb.GenerateRequest, context):
        received = self.frontend.clock()  # the SLO's TTFT and deadline count from here
        rid = m.request_id or new_request_id("req-")
        problem = check_request_id(rid)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id: {problem}")
        try:
            handle, n = self.frontend.start(params_of(m, rid, received))
        except InvalidSampling as e:  # InvalidSlo too: "ttft_ms: ..."
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e.field}: {e.message}")
        except Rejected as r:
            if r.code in ("exhausted", "unavailable"):
                retry_ms = str(int(RETRY_AFTER_S * 1000))
                context.set_trailing_metadata((("retry-after-ms", retry_ms),))
            context.abort(_CODES[r.code], r.message)
        except Exception:
            log.exception("request %r could not start", rid)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        context.add_callback(lambda: self.frontend.cancel(handle.request_id))  # no-op when done
        return handle, n

    def _follow(self, handle, context):
        """The request's tokens; without a deadline time_remaining() is None or grpc's
        far-future value, which the Frontend's follow takes as no deadline."""
        try:
            yield from self.frontend.follow(handle, context.time_remaining())
        except TimeoutError as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))


def params_of(
    m: pb.GenerateRequest, request_id: str, received_s: float | None = None
) -> GenerateParams:
    """The Frontend's view of a GenerateRequest; raises InvalidSampling naming the field. The
    SLO fields are passed on as asked (0 and "" mean not given); the Frontend resolves them
    against its classes (InvalidSlo naming the field: unknown class, a target over the bound)."""
    extra = {name: getattr(m, name, unset) for name, unset in _LATER_FIELDS.items()}
    sampling = SamplingParams.checked(
        max_tokens=m.max_tokens,
        temperature=m.temperature,
        top_p=m.top_p or 1.0,  # proto: 0 (unset) means 1
        top_k=m.top_k,
        seed=m.seed if m.has_seed else None,
        stop_token_ids=m.stop_token_ids,
        ignore_eos=m.ignore_eos,
        logprobs=extra["logprobs"] if extra["has_logprobs"] else None,
        presence_penalty=extra["presence_penalty"],
        frequency_penalty=extra["frequency_penalty"],
        repetition_penalty=extra["repetition_penalty"] or 1.0,  # proto: 0 (unset) means 1
        min_tokens=extra["min_tokens"],
    )
    return GenerateParams(
        prompt=m.prompt,
        prompt_token_ids=tuple(m.prompt_token_ids),
        sampling=sampling,
        request_id=request_id,
        slo=SloAsk(
            extra["slo_class"] or None,
            extra["ttft_ms"] or None,
            extra["tpot_ms"] or None,
            extra["deadline_ms"] or None,
        ),
        received_s=received_s,
    )


# GenerateRequest's fields since issue 17 (sampling) and 19 (SLO), with their proto3 defaults:
# an object that stands in for the message without them (a test's namespace) reads as a
# message that left them unset.
_LATER_FIELDS = {
    "has_logprobs": False,
    "logprobs": 0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 0.0,
    "min_tokens": 0,
    "slo_class": "",
    "ttft_ms": 0,
    "tpot_ms": 0,
    "deadline_ms": 0,
}


def logprobs_pb(logprobs: Sequence[TokenLogprob | None]) -> list[pb.TokenLogprob]:
    """The messages of a request's token logprobs (none when it did not ask). A token without
    logprobs (a simulated worker's) gets a NaN logprob: unknown, never a made-up number."""
    out = []
    for lp in logprobs:
        if lp is None:
            out.append(pb.TokenLogprob(logprob=math.nan))
            continue
        out.append(
            pb.TokenLogprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top_token_ids=[t for t, _ in lp.top],
                top_logprobs=[v for _, v in lp.top],
            )
        )
    return out


def stats_of(frontend: Frontend) -> dict:
    return frontend.stats()


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Scheduler RPCs need `authorization: Bearer <key>`; health and reflection stay open so
    orchestrators can probe without the key."""

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        if not details.method.startswith(f"/{SERVICE_NAME}/"):
            return continuation(details)
        got = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._expected):
            return continuation(details)
        return self._deny_stream if details.method.endswith("/Generate") else self._deny


def build_server(service: SchedulerService, address: str, workers: int = 64, api_key: str = ""):
    """(server, port) with the Scheduler service, health checking and reflection; not started.
    With `api_key`, Scheduler RPCs need it as a bearer token."""
    interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
    return build_grpc_server(
        lambda srv: pb_grpc.add_SchedulerServicer_to_server(service, srv),
        SERVICE_NAME,
        address,
        workers,
        interceptors,
    )
