"""The scheduler's gRPC API over a LiveEngine with a real worker process (tiny model, CPU).

50 concurrent calls finish with the worker's reference greedy output; streaming; the request
store records every lifecycle; bad input is INVALID_ARGUMENT; over capacity is
RESOURCE_EXHAUSTED with a retry hint; cancel and deadlines abort and are recorded.
"""

from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
grpc = pytest.importorskip("grpc")
torch = pytest.importorskip("torch")

from test_live_engine import start_worker, wait_for  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from ecoserve_common.ids import check_request_id  # noqa: E402
from ecoserve_common.pb import scheduler_pb2 as pb  # noqa: E402
from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc  # noqa: E402
from ecoserve_scheduler.core import SchedulerCore, make_policy  # noqa: E402
from ecoserve_scheduler.live import LiveEngine  # noqa: E402
from ecoserve_scheduler.live.api import SchedulerService, build_server  # noqa: E402
from ecoserve_scheduler.live.frontend import ApiLimits, Frontend  # noqa: E402
from ecoserve_scheduler.store import RequestStore, create_schema, make_engine  # noqa: E402
from ecoserve_worker.model_runner import ModelRunner, greedy  # noqa: E402

MAX_TOKENS = 10
WAIT_S = 120


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def reference(model_dir, prompt: list[int], n: int = MAX_TOKENS) -> list[int]:
    runner = ModelRunner(model_dir, num_blocks=16, block_size=16)
    toks = greedy(runner.step([("r", prompt, 0, list(range(16)))]))
    while len(toks) < n:
        toks += greedy(
            runner.step([("r", [toks[-1]], len(prompt) + len(toks) - 1, list(range(16)))])
        )
    return toks


@pytest.fixture
def api(model_dir, tokenizer, tmp_path):
    made = []

    def start(workers=("w0",), max_pending: int = 1024):
        engine = LiveEngine(SchedulerCore(make_policy("ecoserve")), auth_token="k").start()
        procs = [start_worker(engine.address, w, model_dir) for w in workers]
        wait_for(lambda: len(engine.worker_ids()) == len(workers))
        db = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
        create_schema(db)
        store = RequestStore(db)
        limits = ApiLimits(
            max_model_len=2048,
            max_pending=max_pending,
            vocab_size=512,
            queue_without_workers=not workers,  # no worker: requests wait, for these tests
        )
        server, port = build_server(
            SchedulerService(Frontend(engine, tokenizer, store, limits)), "127.0.0.1:0"
        )
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        made.append((engine, procs, server, channel))
        return pb_grpc.SchedulerStub(channel), store, engine

    yield start
    for engine, procs, server, channel in made:
        channel.close()
        server.stop(0).wait()
        for p in procs:
            p.kill()
            p.wait()
        engine.stop()


def req(ids=None, **kw) -> pb.GenerateRequest:
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("ignore_eos", True)
    return pb.GenerateRequest(prompt_token_ids=ids or [], **kw)


def test_fifty_concurrent_calls_match_the_reference(api, model_dir):
    stub, store, _ = api(workers=("w0", "w1"))
    prompts = [[5 + i, 40 + i, 77, 90 + 3 * i, 12] for i in range(10)]
    refs = [reference(model_dir, p) for p in prompts]
    calls = [
        stub.Complete.future(req(p, request_id=f"c{k}-{i}"), timeout=WAIT_S)
        for k in range(5)
        for i, p in enumerate(prompts)
    ]
    for n, call in enumerate(calls):
        r = call.result()
        assert list(r.token_ids) == refs[n % 10] and r.finish_reason == "length"
    row = store.get("c4-9")
    assert (row.status, row.response_tokens, row.prompt_tokens) == ("finished", MAX_TOKENS, 5)
    stats = json.loads(stub.Stats(pb.StatsRequest(), timeout=10).json)
    assert stats["policy"] == "ecoserve" and set(stats["workers"]) == {"w0", "w1"}


def test_generate_streams_text_and_tokens(api, model_dir, tokenizer):
    stub, store, _ = api()
    text = "The scheduler sends the worker a plan."
    ids = tokenizer.encode(text)
    chunks = list(
        stub.Generate(
            pb.GenerateRequest(
                prompt=text, max_tokens=MAX_TOKENS, ignore_eos=True, request_id="g1"
            ),
            timeout=WAIT_S,
        )
    )
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == reference(model_dir, ids)
    assert chunks[-1].finish_reason == "length" and not any(c.finish_reason for c in chunks[:-1])
    info = stub.GetRequest(pb.GetRequestRequest(request_id="g1"), timeout=10)
    assert (info.status, info.response_tokens, info.prompt_tokens) == ("finished", 10, len(ids))
    assert store.get("g1").prompt == text


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"prompt": "   "}, "empty prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens must be > 0"),
        ({"prompt": "hi", "max_tokens": 5000}, "exceeds the model's 2048"),
        ({"prompt": "hi", "temperature": -1.0}, "temperature"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "top_k": -2}, "top_k: top_k must be in"),
        ({"prompt": "hi", "temperature": float("nan")}, "temperature: "),
        ({"prompt": "hi", "request_id": "has space"}, "request_id: "),
        ({"prompt_token_ids": [1, 600]}, "token ids must be in [0, 512)"),
        ({"prompt": "hi", "prompt_token_ids": [1]}, "not both"),
    ],
)
def test_bad_input_is_invalid_argument(api, kw, match):
    stub, store, engine = api(workers=())  # refused before any worker would be asked
    kw.setdefault("max_tokens", 4)
    kw.setdefault("request_id", "bad")
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(pb.GenerateRequest(**kw), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in e.value.details()
    assert store.get("bad") is None and engine.pending == 0  # nothing recorded or queued
    assert stub.Stats(pb.StatsRequest(), timeout=10).pending == 0  # and the service is up


def test_over_capacity_is_refused_and_deadlines_abort(api):
    stub, store, engine = api(workers=(), max_pending=2)  # no worker: nothing can finish
    held = [stub.Complete.future(req([7, 8, 9], request_id=f"h{i}"), timeout=3) for i in range(2)]
    wait_for(lambda: engine.pending == 2)
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(req([1, 2]), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after-ms", "1000") in e.value.trailing_metadata()
    for f in held:
        with pytest.raises(grpc.RpcError) as e:
            f.result()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: engine.pending == 0)  # aborted in the engine, not left behind
    # The server's handler records the end after the client has seen its deadline pass.
    wait_for(lambda: {store.get(f"h{i}").status for i in range(2)} == {"aborted"})


def test_cancel_ends_the_stream(api):
    stub, store, engine = api(workers=())
    stream = stub.Generate(req([7, 8, 9], request_id="x1"), timeout=WAIT_S)
    wait_for(lambda: engine.pending == 1)
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(stream))
    reader.start()
    assert stub.Cancel(pb.CancelRequest(request_id="x1"), timeout=10).found
    reader.join(30)
    assert got[-1].finish_reason == "aborted"
    wait_for(lambda: store.get("x1").status == "aborted")


def test_api_key_guards_scheduler_rpcs_but_not_health(tokenizer):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    engine = LiveEngine(SchedulerCore(make_policy("vllm"))).start()
    server, port = build_server(
        SchedulerService(Frontend(engine, tokenizer)), "127.0.0.1:0", api_key="s3cret"
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            for call in (
                lambda md: stub.Stats(pb.StatsRequest(), timeout=10, metadata=md),
                lambda md: list(stub.Generate(req([1, 2]), timeout=10, metadata=md)),
            ):
                for md in ((), (("authorization", "Bearer wrong"),)):
                    with pytest.raises(grpc.RpcError) as e:
                        call(md)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.Stats(
                pb.StatsRequest(), timeout=10, metadata=(("authorization", "Bearer s3cret"),)
            )
            assert ok.pending == 0
            probe = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert probe.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0).wait()
        engine.stop()


class _Aborted(Exception):
    pass


class _Context:
    """A servicer context that records abort as grpc does (abort raises)."""

    def abort(self, code, details):
        self.code, self.details = code, details
        raise _Aborted

    def add_callback(self, fn) -> None:
        pass


@pytest.mark.parametrize(("field", "value"), [("seed", -1), ("seed", 2**64), ("top_k", 2**32)])
def test_out_of_range_sampling_is_invalid_argument_naming_the_field(field, value):
    """The proto's types keep these off the wire (the client library refuses them); a message
    that carries them anyway reaches the same check: INVALID_ARGUMENT naming the field,
    before the frontend is asked."""
    with pytest.raises(ValueError):
        pb.GenerateRequest(**{field: value})
    m = SimpleNamespace(
        prompt="hi",
        prompt_token_ids=[],
        max_tokens=4,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        has_seed=field == "seed",
        seed=0,
        stop_token_ids=[],
        ignore_eos=False,
        request_id="r1",
    )
    setattr(m, field, value)
    ctx = _Context()
    with pytest.raises(_Aborted):
        SchedulerService(Frontend(engine=None, tokenizer=None))._start(m, ctx)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.details.startswith(f"{field}: ")


def test_bad_sampling_then_serving_goes_on_and_ids_are_minted(api):
    stub, store, _ = api()
    for kw, field in (({"top_k": -1}, "top_k"), ({"temperature": -1.0}, "temperature")):
        with pytest.raises(grpc.RpcError) as e:
            stub.Complete(req([3, 4, 5], **kw), timeout=WAIT_S)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(f"{field}: ")
    done = stub.Complete(req([3, 4, 5], max_tokens=3), timeout=WAIT_S)  # no id given: minted
    assert done.finish_reason == "length" and done.request_id.startswith("req-")
    assert check_request_id(done.request_id) is None
    wait_for(lambda: store.get(done.request_id).status == "finished")
    info = stub.GetRequest(pb.GetRequestRequest(request_id=done.request_id), timeout=10)
    assert (info.status, info.response_tokens) == ("finished", 3)
    assert abs(info.arrival_s - time.time()) < 300  # the store keeps wall-clock time
