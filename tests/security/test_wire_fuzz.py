"""The ZeroMQ codec under fuzzing: whatever bytes arrive, `wire.decode` and the conversions a
receiver runs next (a plan into StepInputs or a BatchPlan, a result into a StepResult) raise
WireError or succeed, never anything else (a stray exception would end a loop), and never
allocate more than a small multiple of the frame (a frame's claims are not trusted).

Inputs: arbitrary bytes, and valid envelopes (plans with random columns, results, registers)
mutated by flipping, inserting, deleting and truncating bytes.
"""

from __future__ import annotations

import tracemalloc

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ecoserve_common.pb import worker_pb2 as pb  # noqa: E402
from ecoserve_common.wire import (  # noqa: E402
    WireError,
    decode,
    encode,
    plan_from_proto,
    result_from_proto,
    step_inputs_from_proto,
)

FAST = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
u32 = st.integers(0, 2**32 - 1)
small = st.lists(u32, max_size=12)


def receive(frame: bytes) -> None:
    """What a scheduler or a worker does with a frame before acting on it."""
    try:
        env, body = decode(frame)
        if body == "plan":
            step_inputs_from_proto(env.plan, "w0")
            plan_from_proto(env.plan, "w0")
        elif body == "result":
            result_from_proto(env.result, "w0")
    except WireError:
        pass


sampling = st.builds(
    pb.SamplingParams,
    temperature=st.floats(width=32, allow_nan=True),
    top_p=st.floats(width=32, allow_nan=True),
    top_k=u32,
    has_seed=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
)
decodes = st.builds(
    pb.DecodeBatch,
    request_ids=st.lists(st.text(max_size=8), max_size=6),
    positions=small,
    token_ids=small,
    table_lens=st.lists(st.integers(0, 2**32 - 1), max_size=6),
    block_ids=small,
    sampling_sets=st.lists(sampling, max_size=3),
    sampling_index=small,
)
prefill = st.builds(
    pb.PrefillChunk,
    request_id=st.text(max_size=8),
    start_pos=u32,
    token_ids=small,
    block_table=st.builds(pb.BlockTable, blocks=small),
    sample=st.booleans(),
    sampling=sampling,
)
plans = st.builds(
    pb.BatchPlan,
    step_id=st.integers(0, 2**64 - 1),
    decodes=decodes,
    prefills=st.lists(prefill, max_size=3),
    block_copies=st.lists(st.builds(pb.BlockCopy, src=u32, dst=u32), max_size=3),
)
bodies = st.one_of(
    plans,
    st.builds(pb.StepResult, step_id=u32, tokens=small, forward_s=st.floats(), error=st.text()),
    st.builds(pb.Register, model_id=st.text(max_size=8), num_blocks=u32, incarnation=st.text()),
    st.builds(pb.Heartbeat, sent_s=st.floats(), steps_done=u32),
    st.builds(pb.Error, code=st.text(max_size=8), step_id=u32),
)


@st.composite
def mutated(draw) -> bytes:
    frame = bytearray(encode(draw(st.text(max_size=8)), draw(bodies)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(frame)))
        if op == "flip" and frame:
            frame[min(at, len(frame) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del frame[at : at + draw(st.integers(1, 8))]
        else:
            del frame[at:]
    return bytes(frame)


@FAST
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_wire_errors(frame):
    receive(frame)


@FAST
@given(mutated())
def test_mutated_envelopes_raise_only_wire_errors(frame):
    receive(frame)


@FAST
@given(plans)
def test_valid_plans_decode_or_are_refused_as_invalid(plan):
    receive(encode("scheduler", plan))


@settings(max_examples=150, deadline=None, database=None)
@given(st.one_of(mutated(), st.binary(max_size=2048)))
def test_memory_stays_proportional_to_the_frame(frame):
    receive(frame)  # once untraced: what is built lazily on a first call is not the frame's
    tracemalloc.start()
    try:
        receive(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 64 * 1024 + 400 * len(frame), (peak, len(frame))


@pytest.mark.parametrize(
    "frame",
    [
        b"\x08\x02\x6a\xff\xff\xff\xff\x07",  # a plan claiming 2 GiB in 8 bytes
        b"\x08\x02\x6a\x06\x12\x04\x32\x82\x80\x80\x80\x08",  # table_lens claiming 2^31 ids
        b"\x08\x02" + b"\x6a\x02\x12\x00" * 1000,  # the same body 1000 times
    ],
)
def test_length_claims_are_not_trusted(frame):
    receive(frame)
