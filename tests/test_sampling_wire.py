"""Issue 17's sampling fields through the contract: validation naming each bad field, the
worker wire both ways (plans carry penalties / min_tokens / logprobs and prompt lengths only
when a row needs them; results carry logprobs only for rows that asked), the core's token
events, min_tokens in the core's stop rule, and the gRPC edge and the SDK that build them.
"""

from __future__ import annotations

import math
import pickle

import pytest

from ecoserve_common.pb import scheduler_pb2
from ecoserve_common.pb import worker_pb2 as pb
from ecoserve_common.plan import StepInputs, TokenLogprob
from ecoserve_common.sampling import InvalidSampling, SamplingParams, check_penalty
from ecoserve_common.wire import (
    WireError,
    decode,
    encode,
    plan_from_proto,
    plan_to_proto,
    result_from_proto,
    result_to_proto,
    step_inputs_from_proto,
)
from ecoserve_scheduler.core import Request, SchedulerCore, StepResult, WorkerSpec, make_policy
from ecoserve_scheduler.core.events import FinishEvent, TokenEvent
from ecoserve_scheduler.live.api import params_of


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": math.inf}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": 1e-40}, "repetition_penalty"),
        ({"repetition_penalty": 3.5}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 1.5}, "min_tokens"),
        ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
    ],
)
def test_each_bad_field_is_named(fields, field):
    with pytest.raises(InvalidSampling) as e:
        SamplingParams.checked(**fields)
    assert e.value.field == field and field in str(e.value)


def test_supported_values_pass_and_defaults_stay_neutral():
    sp = SamplingParams.checked(
        logprobs=20,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=3.0,
        min_tokens=8,
        max_tokens=8,
    )
    assert sp.penalized and sp.needs_prompt_len and sp.processed
    plain = SamplingParams()
    assert not (plain.penalized or plain.needs_prompt_len or plain.processed)
    check_penalty("frequency_penalty", 0.5, 0.0)  # supported now: no longer refused
    check_penalty("repetition_penalty", 1.2, 1.0)
    with pytest.raises(InvalidSampling, match="repetition_penalty"):
        check_penalty("repetition_penalty", 0.0, 1.0)


def live_plans():
    """Plans from a real core: one request asking logprobs and a plain one decode while a
    penalized one with min_tokens arrives and prefills in chunks beside them; each step's
    tokens are fed back as a worker would sample them."""
    core = SchedulerCore(make_policy("vllm"))
    core.add_worker(WorkerSpec("w0", num_blocks=64, block_size=4, token_budget=16))
    lp = SamplingParams(max_tokens=8, logprobs=3, repetition_penalty=1.0)
    core.add(Request("lp", 5, 0.0, lp, prompt_token_ids=tuple(range(50, 55))), 0)
    plain = SamplingParams(max_tokens=8)
    core.add(Request("plain", 4, 0.0, plain, prompt_token_ids=(1, 2, 3, 4)), 0)
    pen = SamplingParams(max_tokens=6, frequency_penalty=0.5, min_tokens=2, stop_token_ids=(9,))
    plans = []
    for t in range(6):
        if t == 1:
            core.add(Request("pen", 20, 1.0, pen, prompt_token_ids=tuple(range(20))), 1.0)
        plan = core.schedule("w0", float(t)).plan
        plans.append(plan)
        core.update(StepResult(plan.step_id, "w0", [7] * len(plan.sampled_ids())), t + 0.5)
    return plans


def test_plans_carry_the_new_fields_and_the_worker_reads_what_the_plan_says():
    plans = live_plans()
    mixed = [p for p in plans if p.prefills and len(p.decodes)]
    assert any(not s.sample for p in mixed for s in p.prefills)  # a chunk beside decodes
    for plan in plans:
        m = plan_to_proto(plan)
        got = step_inputs_from_proto(decode(encode("w0", m))[0].plan, "w0")
        want = StepInputs.from_plan(plan)
        assert got.prompt_lens == want.prompt_lens and got.history_rows == want.history_rows
        pen_rows = [r for r, rid in enumerate(got.request_ids) if rid == "pen"]
        assert got.history_rows == (pen_rows or None)  # every fed row of the penalized one
        for r in pen_rows:
            assert got.prompt_lens[r] == 20
        sent = {s.request_id: s.sampling for s in plan_from_proto(m, "w0").seqs}
        if "pen" in sent:
            s = sent["pen"]
            assert (s.frequency_penalty, s.min_tokens, s.stop_token_ids) == (0.5, 2, (9,))
        if "lp" in sent:
            assert sent["lp"].logprobs == 3 and not sent["lp"].needs_prompt_len
        if "plain" in sent:
            assert sent["plain"] == SamplingParams()  # neutral, as the worker sees it


def test_a_plan_without_extras_carries_none_of_their_bytes():
    core = SchedulerCore(make_policy("vllm"))
    core.add_worker(WorkerSpec("w0", num_blocks=16, block_size=4, token_budget=16))
    core.add(Request("a", 3, 0.0, SamplingParams(max_tokens=4), prompt_token_ids=(1, 2, 3)), 0)
    plan = core.schedule("w0", 0.0).plan
    core.update(StepResult(plan.step_id, "w0", [5]), 0.1)
    m = plan_to_proto(core.schedule("w0", 0.2).plan)
    assert list(m.decodes.prompt_lens) == [] and m.decodes.sampling_sets[0] == pb.SamplingParams(
        top_p=1.0
    )


def test_results_carry_logprobs_only_for_rows_that_asked():
    lps = (
        TokenLogprob(3, -0.25, ((3, -0.25), (8, -1.5))),
        None,
        TokenLogprob(4, -2.0, ()),
    )
    r = StepResult(9, "w1", (3, 1, 4), 0.5, None, (), lps)
    m = result_to_proto(r)
    assert list(m.logprob_rows) == [0, 2] and list(m.top_counts) == [2, 0]
    assert result_from_proto(decode(encode("w1", m))[0].result, "w1") == r
    plain = result_to_proto(StepResult(9, "w1", (3, 1), 0.5))
    assert plain.ByteSize() == pb.StepResult(step_id=9, tokens=[3, 1], forward_s=0.5).ByteSize()
    assert result_from_proto(plain, "w1").logprobs == ()
    m.top_ids.append(5)  # columns that do not fit together
    with pytest.raises(WireError, match="logprob"):
        result_from_proto(m, "w1")


def test_token_events_carry_logprobs_and_pickle():
    core = SchedulerCore(make_policy("vllm"))
    core.add_worker(WorkerSpec("w0", num_blocks=16, block_size=4, token_budget=16))
    sp = SamplingParams(max_tokens=3, logprobs=1)
    core.add(Request("a", 3, 0.0, sp, prompt_token_ids=(1, 2, 3)), 0)
    core.add(Request("b", 2, 0.0, SamplingParams(max_tokens=3), prompt_token_ids=(1, 2)), 0)
    plan = core.schedule("w0", 0.0).plan
    first = TokenLogprob(5, -0.5, ((5, -0.5),))
    lps = [first if rid == "a" else None for rid in plan.sampled_ids()]
    events = core.update(StepResult(plan.step_id, "w0", [5, 6], 0.0, None, (), lps), 0.1)
    tokens = {ev.request_id: ev for ev in events if isinstance(ev, TokenEvent)}
    assert tokens["a"].logprob == first and tokens["b"].logprob is None
    assert pickle.loads(pickle.dumps(tokens["a"])) == tokens["a"]  # engine core -> front end
    plan = core.schedule("w0", 0.2).plan
    bad = StepResult(plan.step_id, "w0", [5, 6], 0.0, None, (), [first])  # one logprob short
    assert all(not isinstance(ev, TokenEvent) for ev in core.update(bad, 0.3))


def test_the_core_does_not_stop_before_min_tokens():
    """A backend that does not mask (the simulator's) returns EOS at once: the core goes on
    until min_tokens tokens came before it."""
    core = SchedulerCore(make_policy("vllm"))
    core.add_worker(WorkerSpec("w0", num_blocks=16, block_size=4, token_budget=16))
    sp = SamplingParams(max_tokens=10, min_tokens=3)
    core.add(Request("a", 2, 0.0, sp, prompt_token_ids=(1, 2), eos_token_id=0), 0)
    finish, n, t = None, 0, 0.0
    while finish is None:
        plan = core.schedule("w0", t).plan
        for ev in core.update(StepResult(plan.step_id, "w0", [0]), t + 0.1):
            n += isinstance(ev, TokenEvent)
            finish = ev.reason if isinstance(ev, FinishEvent) else finish
        t += 1.0
    assert (finish, n) == ("stop", sp.min_tokens + 1)


def grpc_request(**kw):
    return scheduler_pb2.GenerateRequest(prompt="hi", max_tokens=8, **kw)


def test_the_grpc_edge_maps_and_checks_the_new_fields():
    p = params_of(
        grpc_request(
            has_logprobs=True,
            logprobs=4,
            presence_penalty=0.5,
            frequency_penalty=-1.0,
            repetition_penalty=1.25,
            min_tokens=3,
        ),
        "r1",
    ).sampling
    assert (p.logprobs, p.presence_penalty, p.frequency_penalty) == (4, 0.5, -1.0)
    assert (p.repetition_penalty, p.min_tokens) == (1.25, 3)
    plain = params_of(grpc_request(), "r2").sampling
    assert plain.logprobs is None and plain.repetition_penalty == 1.0  # proto 0 means off
    for kw, field in (
        ({"has_logprobs": True, "logprobs": 21}, "logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": -0.5}, "repetition_penalty"),
        ({"min_tokens": 9}, "min_tokens"),
    ):
        with pytest.raises(InvalidSampling) as e:
            params_of(grpc_request(**kw), "r3")
        assert e.value.field == field


def test_the_sdk_sends_the_new_fields_after_checking_them():
    from ecoserve_client.client import _chunk, _request

    m = _request("hi", logprobs=2, frequency_penalty=1.5, repetition_penalty=1.1, min_tokens=1)
    assert (m.has_logprobs, m.logprobs, m.frequency_penalty, m.min_tokens) == (True, 2, 1.5, 1)
    assert m.repetition_penalty == pytest.approx(1.1)
    assert not _request("hi").has_logprobs
    with pytest.raises(InvalidSampling, match="presence_penalty"):
        _request("hi", presence_penalty=-3.0)
    c = scheduler_pb2.GenerateChunk(request_id="r", token_ids=[4])
    c.logprobs.add(token_id=4, logprob=-0.5, top_token_ids=[4, 2], top_logprobs=[-0.5, -1.0])
    assert _chunk(c).logprobs == [TokenLogprob(4, -0.5, ((4, -0.5), (2, -1.0)))]
