"""Frontend: how a request's events reach the HTTP and gRPC streams (follow), and what `start`
hands the core and the store (clocks, ids, checked sampling)."""

from __future__ import annotations

import time

import pytest

from ecoserve_common.ids import check_request_id
from ecoserve_common.sampling import InvalidSampling, SamplingParams
from ecoserve_scheduler.core.events import FinishEvent, PreemptEvent, TokenEvent
from ecoserve_scheduler.live.engine import RequestHandle
from ecoserve_scheduler.live.frontend import Frontend, GenerateParams


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


class _Engine:
    """Stands in for LiveEngine: keeps what is submitted; its clock is the core's clock."""

    pending = 0
    clock = staticmethod(time.monotonic)

    def __init__(self) -> None:
        self.submitted: list = []

    def submit(self, request):
        self.submitted.append(request)
        return RequestHandle(request.request_id)

    def worker_ids(self) -> list[str]:
        return ["w0"]


class _Tokenizer:
    eos_token_id = 2

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 50 + 3 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


class _Store:
    def __init__(self) -> None:
        self.added: list = []

    def add(self, rid, prompt, prompt_tokens, max_tokens, arrival_s, **kw) -> None:
        self.added.append((rid, prompt_tokens, max_tokens, arrival_s))


def test_core_gets_monotonic_arrival_and_the_store_gets_wall_clock():
    """One clock inside: the Request handed to the core is stamped with time.monotonic()
    seconds (the engine's clock, which the core's `now` comes from); the store row with
    time.time() seconds, for people."""
    engine, store = _Engine(), _Store()
    frontend = Frontend(engine, _Tokenizer(), store)
    sampling = SamplingParams.checked(max_tokens=5, seed=7, top_k=3)
    before_mono, before_wall = time.monotonic(), time.time()
    frontend.start(GenerateParams(prompt="hello", sampling=sampling, request_id="cmpl-x1"))
    after_mono, after_wall = time.monotonic(), time.time()
    (req,) = engine.submitted
    assert before_mono <= req.arrival_s <= after_mono
    assert req.slo.jct_deadline_s == float("inf")  # no deadline on another clock
    assert req.sampling is sampling and req.request_id == "cmpl-x1"
    ((rid, n, cap, arrival_wall),) = store.added
    assert (rid, n, cap) == ("cmpl-x1", 5, 5)
    assert before_wall <= arrival_wall <= after_wall


def test_start_mints_an_id_and_refuses_bad_sampling_before_anything_runs():
    engine, store = _Engine(), _Store()
    frontend = Frontend(engine, _Tokenizer(), store)
    frontend.start(GenerateParams(prompt="hi"))
    assert check_request_id(engine.submitted[0].request_id) is None
    bad = SamplingParams(max_tokens=4, top_k=2**32)  # built without `checked`
    with pytest.raises(InvalidSampling) as e:
        frontend.start(GenerateParams(prompt="hi", sampling=bad))
    assert e.value.field == "top_k"
    assert len(engine.submitted) == len(store.added) == 1  # nothing more queued or recorded
