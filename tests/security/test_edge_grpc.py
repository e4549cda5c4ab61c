"""The gRPC edge (issue "Hardening", findings 6 and 9): a call without a deadline is served and
its row ends terminal, every path ends its store row terminal, every Scheduler RPC (streaming
included) needs the API key when one is set, and the predictor binds this machine only unless
told otherwise.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from test_edge_http import FakeEngine, make_frontend, wait_for

from ecoserve_common.pb import scheduler_pb2 as pb
from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc
from ecoserve_scheduler.live.api import SchedulerService, build_server
from ecoserve_scheduler.store import RequestStore, create_schema, make_engine


@pytest.fixture
def grpc_api(tmp_path):
    made = []

    def start(engine: FakeEngine, api_key: str = "", **limits):
        db = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
        create_schema(db)
        store = RequestStore(db)
        frontend = make_frontend(engine, store=store, **limits)
        server, port = build_server(SchedulerService(frontend), "127.0.0.1:0", api_key=api_key)
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        made.append((server, channel))
        return pb_grpc.SchedulerStub(channel), store

    yield start
    for server, channel in made:
        channel.close()
        server.stop(0).wait()


def test_calls_without_a_deadline_are_served_and_recorded(grpc_api):
    """Without a deadline grpc reports a far-future time remaining; waiting on it (a request
    whose tokens are not there yet) raised "timestamp out of range" and left the row queued."""
    engine = FakeEngine(hold=True)
    stub, store = grpc_api(engine)
    done: list = []
    call = pb.GenerateRequest(prompt="hi", max_tokens=3, request_id="c1")
    t = threading.Thread(target=lambda: done.append(stub.Complete(call)))
    t.start()
    stream = stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=2, request_id="g1"))
    chunks: list = []
    reader = threading.Thread(target=lambda: chunks.extend(stream))
    reader.start()
    wait_for(lambda: engine.pending == 2)
    time.sleep(0.3)  # both handlers are waiting for tokens now
    engine.run("c1")
    engine.run("g1")
    t.join(10)
    reader.join(10)
    assert done[0].finish_reason == "length" and len(done[0].token_ids) == 3
    assert chunks[-1].finish_reason == "length"
    wait_for(lambda: store.get("c1").status == store.get("g1").status == "finished")


def test_every_grpc_path_ends_its_row_terminal(grpc_api):
    engine = FakeEngine(hold=True)
    stub, store = grpc_api(engine)
    # a streaming call the client cancels, without a deadline
    stream = stub.Generate(pb.GenerateRequest(prompt="s", max_tokens=5, request_id="cancelled"))
    wait_for(lambda: engine.pending == 1)
    engine.tokens("cancelled", 1)
    assert next(stream).token_ids == [40]
    stream.cancel()
    # a unary call whose deadline passes
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(pb.GenerateRequest(prompt="d", max_tokens=5, request_id="late"), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # a call the engine fails
    failed: list = []
    call = pb.GenerateRequest(prompt="f", max_tokens=5, request_id="broken")
    t = threading.Thread(target=lambda: failed.append(stub.Complete(call, timeout=30)))
    t.start()
    wait_for(lambda: "broken" in engine.handles)
    engine.finish("broken", "failed: worker error: boom")
    t.join(10)
    assert failed[0].finish_reason == "failed: worker error: boom"
    want = {"cancelled": "aborted", "late": "aborted", "broken": "failed"}
    wait_for(lambda: {rid: store.get(rid).status for rid in want} == want)
    assert engine.pending == 0 and set(engine.cancelled) >= {"cancelled", "late"}


def test_a_duplicate_id_is_already_exists_without_database_text(grpc_api):
    stub, store = grpc_api(FakeEngine())
    stub.Complete(pb.GenerateRequest(prompt="hi", max_tokens=2, request_id="dup"), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(pb.GenerateRequest(prompt="hi", max_tokens=2, request_id="dup"), timeout=10)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    details = e.value.details()
    assert "dup" in details
    for leak in ("INSERT", "UNIQUE", "sqlite", "served_requests", "IntegrityError", "[SQL"):
        assert leak not in details
    assert store.get("dup").status == "finished"  # the first one's row is untouched


def test_every_scheduler_rpc_needs_the_api_key(grpc_api):
    stub, _ = grpc_api(FakeEngine(), api_key="s3cret")
    hi = pb.GenerateRequest(prompt="hi", max_tokens=2)
    calls = {
        "Complete": lambda md: stub.Complete(hi, 10, md),
        "Generate": lambda md: list(stub.Generate(hi, 10, md)),
        "Cancel": lambda md: stub.Cancel(pb.CancelRequest(request_id="x"), 10, md),
        "GetRequest": lambda md: stub.GetRequest(pb.GetRequestRequest(request_id="x"), 10, md),
        "Stats": lambda md: stub.Stats(pb.StatsRequest(), 10, md),
    }
    assert set(calls) == set(pb.DESCRIPTOR.services_by_name["Scheduler"].methods_by_name)
    for name, call in calls.items():
        for md in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            with pytest.raises(grpc.RpcError) as e:
                call(md)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    key = (("authorization", "Bearer s3cret"),)
    assert calls["Complete"](key).finish_reason == "length"
    assert calls["Generate"](key)[-1].finish_reason == "length"
    assert calls["Stats"](key).pending == 0


def test_over_capacity_is_refused_at_once(grpc_api):
    engine = FakeEngine(hold=True)
    stub, _ = grpc_api(engine, max_pending=1)
    held = stub.Complete.future(pb.GenerateRequest(prompt="a", max_tokens=2), timeout=30)
    wait_for(lambda: engine.pending == 1)
    with pytest.raises(grpc.RpcError) as e:  # a queued call would end DEADLINE_EXCEEDED instead
        stub.Complete(pb.GenerateRequest(prompt="b", max_tokens=2), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and engine.pending == 1
    engine.finish_all()
    assert held.result().finish_reason == "length"


def test_the_predictor_binds_this_machine_only_by_default():
    from ecoserve_predictor.__main__ import build_parser

    assert build_parser().parse_args(["serve"]).address == "127.0.0.1:50061"
    assert build_parser().parse_args(["serve", "--address", "0.0.0.0:1"]).address == "0.0.0.0:1"


def test_with_no_worker_registered_a_call_is_unavailable_at_once(grpc_api):
    engine = FakeEngine(hold=True)
    engine.worker_ids = lambda: []
    stub, store = grpc_api(engine)
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(pb.GenerateRequest(prompt="hi", max_tokens=2, request_id="nw"), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no worker is registered" in e.value.details()
    assert dict(e.value.trailing_metadata())["retry-after-ms"] == "1000"
    assert engine.submitted == [] and store.get("nw") is None  # refused: nothing recorded
