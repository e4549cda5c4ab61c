"""RequestHandle: a submitted request as its caller sees it, whichever engine holds it (an
in-process LiveEngine or an engine core in its own process behind EngineClient)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from ecoserve_common.plan import TokenLogprob

from ..core.events import FinishEvent, TokenEvent
from ..core.request import Request
from .slo import RequestSlo


@dataclass
class RequestHandle:
    """A submitted request as its caller sees it: events in order, ending with FinishEvent.
    `logprobs` is empty unless the request asked for them (`wants_logprobs`); then logprobs[i]
    is tokens[i]'s (None where the worker gave none: a simulated one). `slo` and `received_s`
    are the front end's, set after submit (never sent to the engine core)."""

    request_id: str
    events: queue.Queue = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    wants_logprobs: bool = False
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    # Set by the Frontend once submitted: the request's SLO (None: it has none) and when the
    # edge received it (the Frontend's clock), for the per-class SLO counts (slo.SloLedger).
    slo: RequestSlo | None = None
    received_s: float = 0.0

    @classmethod
    def of(cls, request: Request) -> RequestHandle:
        return cls(request.request_id, wants_logprobs=request.sampling.logprobs is not None)

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def receive(self, ev) -> None:
        """One of its events from the core: a token is kept and queued; a finish closes the
        handle; a preemption is queued (recompute keeps the outputs: the stream just pauses)."""
        if isinstance(ev, FinishEvent):
            close_handle(self, ev.reason)
            return
        if isinstance(ev, TokenEvent):
            self.tokens.append(ev.token_id)
            if self.wants_logprobs:  # before the put: a reader sees both lists as long
                self.logprobs.append(ev.logprob)
        self.events.put(ev)


def close_handle(handle: RequestHandle, reason: str) -> None:
    handle.finish_reason = reason
    handle.events.put(FinishEvent(handle.request_id, reason))
    handle.done.set()
