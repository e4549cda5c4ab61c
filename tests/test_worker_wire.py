"""The worker wire format: plans and results survive a frame round trip; bad frames get a code."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecoserve_common.pb import worker_pb2 as pb
from ecoserve_common.plan import StepInputs
from ecoserve_common.wire import (
    PROTOCOL_VERSION,
    WireError,
    decode,
    encode,
    plan_from_proto,
    plan_to_proto,
    result_from_proto,
    result_to_proto,
    step_inputs_from_proto,
)
from ecoserve_scheduler.core import (
    Request,
    SamplingParams,
    SchedulerCore,
    StepResult,
    WorkerSpec,
    make_policy,
)

REPO = Path(__file__).resolve().parents[1]


def live_plans(steps: int = 4):
    """Plans from a real core: a chunked prefill, decodes, seeded and greedy sampling."""
    core = SchedulerCore(make_policy("vllm"))
    core.add_worker(WorkerSpec("w0", num_blocks=64, block_size=4, token_budget=16))
    core.add(
        Request("a", 6, 0.0, SamplingParams(max_tokens=8), prompt_token_ids=tuple(range(6))), 0
    )
    sp = SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, top_k=5, seed=11)
    core.add(Request("b", 20, 0.0, sp, prompt_token_ids=tuple(range(100, 120))), 0)
    plans = []
    for t in range(steps):
        plan = core.schedule("w0", float(t)).plan
        plans.append(plan)
        core.update(StepResult(plan.step_id, "w0", [7] * len(plan.sampled_ids())), t + 0.5)
    return plans


def test_plans_round_trip_through_frames():
    plans = live_plans()
    assert any(p.prefills for p in plans) and any(len(p.decodes) for p in plans)
    for plan in plans:
        env, body = decode(encode("w0", plan_to_proto(plan)))
        assert body == "plan" and env.worker_id == "w0"
        back = plan_from_proto(env.plan, "w0")
        assert back.step_id == plan.step_id
        assert back.decodes.request_ids == plan.decodes.request_ids
        assert back.decodes.positions == plan.decodes.positions
        assert [list(t) for t in back.decodes.block_tables] == [
            list(t) for t in plan.decodes.block_tables
        ]
        assert back.decodes.token_ids == (plan.decodes.token_ids or ())
        for a, b in zip(back.prefills, plan.prefills, strict=True):
            assert (
                a.request_id,
                a.start_pos,
                a.num_tokens,
                a.block_table,
                a.sample,
                a.token_ids,
            ) == (b.request_id, b.start_pos, b.num_tokens, b.block_table, b.sample, b.token_ids)
            assert (a.sampling.temperature, a.sampling.top_k, a.sampling.seed) == (
                pytest.approx(b.sampling.temperature),
                b.sampling.top_k,
                b.sampling.seed,
            )
        assert back.sampled_ids() == plan.sampled_ids()


def test_results_round_trip():
    r = StepResult(9, "w1", (3, 1, 4), 0.0125, None)
    env, body = decode(encode("w1", result_to_proto(r)))
    assert body == "result" and result_from_proto(env.result, "w1") == r
    failed = StepResult(10, "w1", (), 0.0, "CUDA out of memory")
    env, _ = decode(encode("w1", result_to_proto(failed)))
    assert result_from_proto(env.result, "w1").error == "CUDA out of memory"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\xff\xff\xff", "malformed"),
        (pb.Envelope(protocol_version=PROTOCOL_VERSION + 1).SerializeToString(), "version"),
        (pb.Envelope(protocol_version=PROTOCOL_VERSION).SerializeToString(), "unknown"),
    ],
)
def test_bad_frames_raise_a_coded_error(frame, code):
    with pytest.raises(WireError) as e:
        decode(frame)
    assert e.value.code == code and e.value.message


def _decodes(**overrides) -> pb.DecodeBatch:
    cols = dict(
        request_ids=["a", "b"],
        positions=[5, 9],
        token_ids=[1, 2],
        table_lens=[2, 3],
        block_ids=[0, 1, 2, 3, 4],
        sampling_sets=[pb.SamplingParams()],
        sampling_index=[0, 0],
    )
    return pb.DecodeBatch(**{**cols, **overrides})


def test_decode_columns_split_back_into_rows():
    plan = plan_from_proto(pb.BatchPlan(step_id=3, decodes=_decodes()), "w0")
    assert [list(t) for t in plan.decodes.block_tables] == [[0, 1], [2, 3, 4]]
    assert plan.decodes.sampling[0] is plan.decodes.sampling[1]  # one set, shared


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"positions": [1]}, "differ in length"),
        ({"table_lens": [2]}, "differ in length"),
        ({"block_ids": [0, 1, 2]}, "do not cover"),
        ({"sampling_index": [0, 1]}, "past sampling_sets"),
    ],
)
@pytest.mark.parametrize("from_proto", [plan_from_proto, step_inputs_from_proto])
def test_inconsistent_decode_columns_are_invalid(overrides, match, from_proto):
    m = pb.BatchPlan(step_id=3, decodes=_decodes(**overrides))
    with pytest.raises(WireError, match=match) as e:
        from_proto(m, "w0")
    assert e.value.code == "invalid"


def test_step_inputs_off_the_wire_are_the_plans_columns():
    """What the worker runs (columns straight from the protobuf) is the plan it was sent."""
    plans = live_plans()
    assert any(p.prefills and len(p.decodes) for p in plans)  # mixed steps too
    for plan in plans:
        env, _ = decode(encode("w0", plan_to_proto(plan)))
        got = step_inputs_from_proto(env.plan, "w0")
        want = StepInputs.from_plan(plan)
        for field in (
            "step_id",
            "worker_id",
            "request_ids",
            "positions",
            "token_ids",
            "table_lens",
            "block_ids",
            "num_decodes",
            "query_lens",
            "sample_rows",
        ):
            assert getattr(got, field) == getattr(want, field), field
        assert list(got.block_copies) == list(want.block_copies)

        def settings(inp):
            rows = (inp.sampling_sets[i] for i in inp.sampling_index)
            return [(round(s.temperature, 5), round(s.top_p, 5), s.top_k, s.seed) for s in rows]

        assert settings(got) == settings(want)
        assert got.sampled_ids() == want.sampled_ids() == plan.sampled_ids()
        assert got.shape() == want.shape() == plan.shape()
        assert got.num_tokens == plan.num_tokens


def test_prefill_without_tokens_is_invalid():
    chunk = pb.PrefillChunk(request_id="p", start_pos=0, block_table=pb.BlockTable(blocks=[0]))
    m = pb.BatchPlan(step_id=4, decodes=_decodes(), prefills=[chunk])
    with pytest.raises(WireError, match="has no tokens"):
        step_inputs_from_proto(m, "w0")


def test_simulator_plans_cannot_be_sent():
    core = SchedulerCore(make_policy("vllm"))
    core.add_worker(WorkerSpec("w0", num_blocks=8, block_size=4, token_budget=16))
    core.add(Request("a", 3, 0.0), 0.0)  # no prompt ids: a simulator request
    plan = core.schedule("w0", 0.0).plan
    core.update(StepResult(plan.step_id, "w0", [1]), 0.1)
    with pytest.raises(ValueError, match="token ids"):
        plan_to_proto(core.schedule("w0", 0.2).plan)


def test_encode_rejects_a_non_body_message():
    with pytest.raises(TypeError):
        encode("w0", pb.BlockTable())


def test_equal_sampling_settings_are_sent_once():
    from ecoserve_common.plan import BatchPlan, DecodeBatch

    hot = SamplingParams(temperature=0.8, seed=3)
    rows = (SamplingParams(), SamplingParams(max_tokens=9), hot, hot)  # first two: equal settings
    d = DecodeBatch(("a", "b", "c", "d"), (1, 2, 3, 4), ([0], [1], [2], [3]), rows, (5, 6, 7, 8))
    m = plan_to_proto(BatchPlan(1, "w0", d))
    assert len(m.decodes.sampling_sets) == 2 and list(m.decodes.sampling_index) == [0, 0, 1, 1]
    back = plan_from_proto(m, "w0").decodes.sampling
    assert [(s.temperature, s.seed) for s in back] == [(0.0, None)] * 2 + [
        (pytest.approx(0.8), 3)
    ] * 2
