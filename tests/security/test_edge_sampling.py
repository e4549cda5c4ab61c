"""Sampling input is refused at the edge, HTTP and gRPC alike, through the contract's one
definition (issue "Hardening", finding 2): every numeric field bounded, stop lists bounded in
count and length, OpenAI's penalties finite. HTTP answers OpenAI's 400 naming the field; gRPC
INVALID_ARGUMENT whose details start with the field. Nothing reaches the engine.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import grpc
import pytest
from fastapi.testclient import TestClient
from test_edge_http import FakeEngine, make_frontend

from ecoserve_common.pb import scheduler_pb2 as pb
from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc
from ecoserve_common.sampling import InvalidSampling, SamplingParams
from ecoserve_scheduler.live.api import SchedulerService, build_server
from ecoserve_scheduler.live.http_api import create_app

NAN = float("nan")

# (field, value) pairs every edge refuses, naming the field
BAD = [
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 2**64),
    ("top_k", -5),
    ("top_k", 2**31),
    ("top_k", 2**32),
    ("temperature", -0.5),
    ("temperature", NAN),
    ("temperature", math.inf),
    ("temperature", 1e-40),
    ("temperature", 1e-5),
    ("temperature", 1e10),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_p", NAN),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2**40),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [2**32]),
    ("stop_token_ids", list(range(65))),
]
HTTP_ONLY = [
    ("presence_penalty", NAN),
    ("presence_penalty", 1e308 * 10),
    ("frequency_penalty", 5.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", 0.0),  # would divide by zero
    ("min_tokens", 5),  # more than max_tokens
    ("min_tokens", -1),
    ("top_logprobs", 21),
    ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", "s" * 300),
    ("n", 0),
    ("n", 17),
]


def _json(body: dict) -> bytes:
    """JSON as Python writes it: NaN and Infinity included (Python's parser takes them)."""
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def http():
    engine = FakeEngine()
    app = create_app(make_frontend(engine), "tiny")
    with TestClient(app) as c:
        yield c, engine


@pytest.mark.parametrize(("field", "value"), BAD + HTTP_ONLY)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_http_refuses_bad_sampling_with_openais_400_naming_the_field(http, path, field, value):
    c, engine = http
    before = len(engine.submitted)
    body: dict = {"max_tokens": 3, field: value}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    r = c.post(path, content=_json(body), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", field)
    assert field in err["message"]
    assert len(engine.submitted) == before  # nothing reached the engine
    ok = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200  # and serving goes on


@pytest.mark.parametrize(("field", "value"), BAD)
def test_grpc_refuses_bad_sampling_with_invalid_argument_naming_the_field(field, value):
    """Values the proto cannot carry (seed -1, top_k 2**32) are refused by the client library
    itself; a message that carries them anyway reaches the same check."""
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

    class Aborted(Exception):
        pass

    class Context:
        def abort(self, code, details):
            self.code, self.details = code, details
            raise Aborted

    engine = FakeEngine()
    ctx = Context()
    with pytest.raises(Aborted):
        SchedulerService(make_frontend(engine))._start(m, ctx)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.details.startswith(f"{field}: ")
    assert engine.submitted == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 1e-40), ("temperature", NAN), ("seed", 2**63), ("max_tokens", 0)],
)
def test_grpc_over_the_wire(field, value):
    engine = FakeEngine()
    server, port = build_server(SchedulerService(make_frontend(engine)), "127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            kw = {"prompt": "hi", "max_tokens": 3, field: value}
            if field == "seed":
                kw["has_seed"] = True
            with pytest.raises(grpc.RpcError) as e:
                stub.Complete(pb.GenerateRequest(**kw), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith(f"{field}: ")
            ok = stub.Complete(pb.GenerateRequest(prompt="hi", max_tokens=2), timeout=10)
            assert ok.finish_reason == "length"
    finally:
        server.stop(0).wait()
    assert len(engine.submitted) == 1


def test_the_contract_bounds_what_a_worker_may_rely_on():
    ok = SamplingParams.checked(temperature=1e-3, top_k=2**31 - 1, seed=2**63 - 1)
    assert ok.seed == 2**63 - 1
    SamplingParams.checked(temperature=0.0, top_p=1e-9, max_tokens=2**31 - 1)
    for kw in ({"temperature": 9e-4}, {"seed": True}, {"top_k": 1.5}, {"max_tokens": 2.0}):
        with pytest.raises(InvalidSampling):
            SamplingParams.checked(**kw)
