"""Frontend.follow: how a request's events reach the HTTP and gRPC streams."""

from __future__ import annotations

from ecoserve_scheduler.core.events import FinishEvent, PreemptEvent, TokenEvent
from ecoserve_scheduler.live.engine import RequestHandle
from ecoserve_scheduler.live.frontend import Frontend


def test_follow_hands_over_queued_tokens_together_then_the_finish():
    """A reader that fell behind gets every queued token in one hop, in order; a preemption
    (recompute keeps the outputs) adds nothing; the finish comes last, on its own."""
    frontend = Frontend(engine=None, tokenizer=None)
    handle = RequestHandle("r")
    for ev in (
        TokenEvent("r", 5, 0),
        TokenEvent("r", 6, 1),
        PreemptEvent("r", "recompute"),
        TokenEvent("r", 7, 2),
    ):
        handle.events.put(ev)
    stream = frontend.follow(handle)
    assert next(stream) == ([5, 6, 7], None)
    handle.events.put(TokenEvent("r", 8, 3))
    handle.events.put(FinishEvent("r", "length"))
    assert list(stream) == [([8], None), ([], "length")]
