"""TextStream: token ids to text as they stream, stop strings cut across token boundaries, and
Frontend.follow_text / with_eos over a fake engine (no worker)."""

from __future__ import annotations

import queue

import pytest

from ecoserve_common.sampling import SamplingParams
from ecoserve_scheduler.core.events import FinishEvent, TokenEvent
from ecoserve_scheduler.live.detokenize import TextStream
from ecoserve_scheduler.live.engine import RequestHandle
from ecoserve_scheduler.live.frontend import Frontend
from ecoserve_scheduler.live.tokenizer import ModelTokenizer

TEXT = "The scheduler sends the worker a plan. ünïcödé 🙂 and more words here."


@pytest.fixture(scope="module")
def tok(model_dir):
    return ModelTokenizer(model_dir)


def pieces(tok, ids, stop=(), step=1):
    s = TextStream(tok, stop)
    out = [s.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    out.append(s.flush())
    return s, out


@pytest.mark.parametrize("step", [1, 2, 5])
def test_streamed_text_equals_the_whole_decode_and_never_splits_a_character(tok, step):
    ids = tok.encode(TEXT)[1:]  # no BOS
    s, out = pieces(tok, ids, step=step)
    assert "".join(out) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in out)  # multi-byte characters arrive whole
    assert not s.stopped and s.tokens_used == len(ids)


@pytest.mark.parametrize("stop", [" worker", "ds the w", "ün", "🙂", "plan. ü"])
def test_stop_string_across_token_boundaries_is_cut_and_excluded(tok, stop):
    ids = tok.encode(TEXT)[1:]
    s, out = pieces(tok, ids, stop=("never there", stop))
    got = "".join(out)
    assert got == TEXT[: TEXT.index(stop)] and s.stopped
    # the stream stopped at the token that completed the stop string, not later
    assert stop in tok.decode(ids[: s.tokens_used])
    assert stop not in tok.decode(ids[: s.tokens_used - 1])
    assert s.push(ids[:3]) == "" and s.flush() == ""


def test_a_tail_that_may_start_a_stop_string_is_held_back_then_released(tok):
    ids = tok.encode(" the worker")[1:]
    s = TextStream(tok, stop=(" the workers!",))
    assert "".join(s.push([i]) for i in ids) == ""  # it could still become the stop string
    assert s.flush() == " the worker" and not s.stopped


def test_earliest_stop_string_wins(tok):
    ids = tok.encode(TEXT)[1:]
    _, out = pieces(tok, ids, stop=("more", "sends"))
    assert "".join(out) == "The scheduler "


class FakeEngine:
    def __init__(self):
        self.cancelled = []
        self.pending = 0

    def cancel(self, rid):
        self.cancelled.append(rid)

    def worker_ids(self) -> list[str]:
        return ["w0"]


class Store:
    def __init__(self):
        self.ends = []

    def mark_running(self, rid):
        pass

    def finish(self, rid, n, now):
        self.ends.append(("finished", rid, n))

    def abort(self, rid, now):
        self.ends.append(("aborted", rid))

    def fail(self, rid, reason, now):
        self.ends.append(("failed", rid, reason))


def handle_with(ids, reason):
    h = RequestHandle("r1", queue.Queue())
    for i, t in enumerate(ids):
        h.events.put(TokenEvent("r1", t, i))
        h.tokens.append(t)
    h.events.put(FinishEvent("r1", reason))
    return h


def test_follow_text_stops_at_a_stop_string_aborts_and_records_finished(tok):
    ids = tok.encode(TEXT)[1:]
    engine, store = FakeEngine(), Store()
    fe = Frontend(engine, tok, store)
    out = list(fe.follow_text(handle_with(ids, "length"), SamplingParams(), ("worker",)))
    assert "".join(t for t, _, _ in out) == "The scheduler sends the "
    (_, reason, n), *_ = out[-1:]
    assert reason == "stop" and n < len(ids)
    assert engine.cancelled == ["r1"] and store.ends == [("finished", "r1", n)]


def test_follow_text_leaves_the_ending_eos_out_of_the_text(tok):
    ids = tok.encode("hello there")[1:] + [tok.eos_token_id]
    fe = Frontend(FakeEngine(), tok)
    out = list(fe.follow_text(handle_with(ids, "stop"), SamplingParams()))
    assert "".join(t for t, _, _ in out) == "hello there"
    assert out[-1][1:] == ("stop", len(ids))
    # with ignore_eos the EOS is text like any token (the core did not stop at it)
    out = list(fe.follow_text(handle_with(ids, "length"), SamplingParams(ignore_eos=True)))
    assert "".join(t for t, _, _ in out) == "hello there</s>"


def test_extra_eos_ids_become_stop_ids_unless_ignore_eos(tok):
    class Multi:
        eos_token_id = 2
        eos_token_ids = (2, 7, 9)

    fe = Frontend(FakeEngine(), Multi())
    assert fe.with_eos(SamplingParams(stop_token_ids=(9, 4))).stop_token_ids == (9, 4, 7)
    assert fe.with_eos(SamplingParams(ignore_eos=True)).stop_token_ids == ()
    assert Frontend(FakeEngine(), tok).with_eos(SamplingParams()).stop_token_ids == ()
