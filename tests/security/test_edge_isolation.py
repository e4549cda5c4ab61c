"""One poisoned row fails one request, not its batch (issue "Hardening", finding 4).

Poison never gets past the edge (test_edge_sampling.py), but a row's sampling can still fail on
the worker (NaN logits, say). Then only that request fails, with a reason that reaches the
store and its client, and every other row of the step keeps its token: the worker reports the
row in StepResult.failed (carried on the wire), the core fails that request alone.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient
from test_edge_http import FakeEngine, FakeTokenizer, make_frontend

from ecoserve_common.plan import StepResult
from ecoserve_common.sampling import SamplingParams
from ecoserve_common.wire import decode, encode, result_from_proto, result_to_proto
from ecoserve_scheduler.core import (
    FinishEvent,
    Request,
    SchedulerCore,
    Status,
    TokenEvent,
    WorkerSpec,
    make_policy,
)
from ecoserve_scheduler.live.http_api import create_app
from ecoserve_scheduler.store import RequestStore, create_schema, make_engine

REASON = "ValueError: sampling probabilities are not finite"


def test_the_core_fails_only_the_request_whose_row_failed():
    core = SchedulerCore(make_policy("vllm"))
    core.add_worker(WorkerSpec("w0", num_blocks=64, block_size=4, token_budget=64))
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    for rid in ("a", "b", "c"):
        core.add(Request(rid, 3, 0.0, sp, prompt_token_ids=(5, 6, 7)), 0.0)
    plan = core.schedule("w0", 0.0).plan
    assert plan.sampled_ids() == ["a", "b", "c"]
    result = StepResult(plan.step_id, "w0", (11, 0, 13), 0.01, None, (("b", REASON),))
    events = core.update(result, 0.1)
    assert FinishEvent("b", f"failed: sampling: {REASON}") in events
    assert {e.request_id: e.token_id for e in events if isinstance(e, TokenEvent)} == {
        "a": 11,
        "c": 13,
    }
    b = core.requests["b"]
    assert b.status is Status.FAILED and b.output_token_ids == []
    assert not core.workers["w0"].ledger.has("b")  # its KV blocks are free
    core.release("b")
    plan = core.schedule("w0", 0.2).plan
    assert plan.sampled_ids() == ["a", "c"]  # the others go on decoding


def test_row_failures_cross_the_wire():
    r = StepResult(4, "w1", (1, 0, 3), 0.5, None, (("b", REASON), ("d", "x")))
    env, body = decode(encode("w1", result_to_proto(r)))
    assert body == "result" and result_from_proto(env.result, "w1") == r


class _Runner:
    """A model runner whose forward pass returns fixed logits."""

    device = "cpu"

    def __init__(self, logits) -> None:
        self.logits = logits

    def copy_blocks(self, copies) -> None:
        pass

    def forward(self, inp):
        return self.logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])  # the greedy batch path and the per-row one
def test_the_worker_reports_a_poisoned_row_and_keeps_the_others(temperature):
    torch = pytest.importorskip("torch")
    from ecoserve_worker.backends import ModelBackend
    from ecoserve_worker.model_runner import inputs_from_rows

    inp = inputs_from_rows([(rid, [1], 0, [i]) for i, rid in enumerate("abc")], step_id=7)
    inp = replace(inp, sampling_sets=[SamplingParams(temperature=temperature, seed=5)])
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    logits[1] = float("nan")
    result = ModelBackend(_Runner(logits), model_id="stub").execute(inp)
    assert result.error is None and result.step_id == 7
    assert [rid for rid, _ in result.failed] == ["b"] and "finite" in result.failed[0][1]
    assert len(result.tokens) == 3 and all(0 <= t < 40 for t in result.tokens)
    if temperature == 0.0:
        assert [result.tokens[0], result.tokens[2]] == logits[[0, 2]].argmax(-1).tolist()


def test_the_reason_reaches_the_client_and_the_store(tmp_path):
    db = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(db)
    store = RequestStore(db)
    engine = FakeEngine(hold=True)
    app = create_app(make_frontend(engine, store=store), "tiny")
    why = f"failed: sampling: {REASON}"
    with TestClient(app) as c:
        got: dict = {}

        def call(name: str, body: dict) -> None:
            with c.stream("POST", "/v1/completions", json=body) as r:
                got[name] = (r.status_code, r.read().decode())

        bodies = {
            "poisoned": {"prompt": "p", "max_tokens": 3},
            "streamed": {"prompt": "q", "max_tokens": 3, "stream": True},
            "healthy": {"prompt": "h", "max_tokens": 3},
        }
        threads = [threading.Thread(target=call, args=kv) for kv in bodies.items()]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while engine.pending < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        by_prompt = {req.prompt_token_ids: req.request_id for req in engine.submitted}
        tok = FakeTokenizer()
        rid = {name: by_prompt[tuple(tok.encode(b["prompt"]))] for name, b in bodies.items()}
        for name in ("poisoned", "streamed"):
            engine.tokens(rid[name], 1)
            engine.finish(rid[name], why)
        engine.run(rid["healthy"])
        for t in threads:
            t.join(10)
    status, text = got["poisoned"]
    err = json.loads(text)["error"]
    assert status == 500 and err["type"] == "server_error" and err["message"] == why
    status, text = got["streamed"]
    events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    assert status == 200 and events[-2]["choices"][0]["finish_reason"] == "error"
    assert events[-1]["error"]["message"] == why and text.rstrip().endswith("data: [DONE]")
    status, text = got["healthy"]
    assert status == 200 and json.loads(text)["choices"][0]["finish_reason"] == "length"
    for name in ("poisoned", "streamed"):
        row = store.get(rid[name])
        assert (row.status, row.fail_reason) == ("failed", why)
    assert store.get(rid["healthy"]).status == "finished"
