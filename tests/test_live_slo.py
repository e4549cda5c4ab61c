"""Live latency SLOs (issue 19, item 5): requests carry an SLO through both APIs, the Frontend
hands it to the core's Request, it survives the engine-process boundary and orders the queue,
and the scheduler counts attainment per SLO class for Prometheus.

- classes and explicit targets (live/slo.py), the settings that configure them;
- HTTP: the `ecoserve` body object, validated (400 naming `ecoserve.<field>`), through the
  official `openai` client's `extra_body`; `priority` still refused, pointing at it;
- gRPC: GenerateRequest's SLO fields (INVALID_ARGUMENT naming the field), and the SDK's keywords;
- the per-class Prometheus series counting a met and a missed request (a 1 ms TTFT target);
- the engine core in its own process with a real worker: a request with a deadline overtakes
  late ones queued before it under the ecoserve policy (and not under vllm's FIFO).
"""

from __future__ import annotations

import json
import math
import pickle
import threading
import time

import pytest

pytest.importorskip("fastapi")
grpc = pytest.importorskip("grpc")

from security.test_edge_http import FakeEngine, FakeTokenizer  # noqa: E402

from ecoserve_common.pb import scheduler_pb2 as pb  # noqa: E402
from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc  # noqa: E402
from ecoserve_common.sampling import InvalidSampling, SamplingParams  # noqa: E402
from ecoserve_scheduler.core.events import TokenEvent  # noqa: E402
from ecoserve_scheduler.core.request import SLO, Request  # noqa: E402
from ecoserve_scheduler.live.api import SchedulerService, build_server  # noqa: E402
from ecoserve_scheduler.live.frontend import ApiLimits, Frontend, GenerateParams  # noqa: E402
from ecoserve_scheduler.live.handle import RequestHandle  # noqa: E402
from ecoserve_scheduler.live.settings import SchedulerSettings  # noqa: E402
from ecoserve_scheduler.live.slo import (  # noqa: E402
    CUSTOM,
    MAX_SLO_MS,
    InvalidSlo,
    RequestSlo,
    SloAsk,
    SloClasses,
    SloTargets,
)

DEFAULTS = SchedulerSettings().slo_table()  # interactive 1 s / 0.2 s, standard, batch
USER = [{"role": "user", "content": "hi"}]


def frontend_with(engine=None, classes: SloClasses | None = DEFAULTS, **limits) -> Frontend:
    limits.setdefault("max_model_len", 2048)
    limits.setdefault("vocab_size", 512)
    return Frontend(
        engine or FakeEngine(), FakeTokenizer(), None, ApiLimits(**limits), slo_classes=classes
    )


# ---- classes, targets, settings --------------------------------------------------------------


def test_a_class_gives_its_targets_and_explicit_values_override_them():
    inter = DEFAULTS.resolve(SloAsk("interactive"))
    assert inter == RequestSlo("interactive", SloTargets(1.0, 0.2, None))
    over = DEFAULTS.resolve(SloAsk("interactive", ttft_ms=300, deadline_ms=9000))
    assert over == RequestSlo("interactive", SloTargets(0.3, 0.2, 9.0))
    # explicit only: those targets alone, labelled custom (not merged with the default class)
    assert DEFAULTS.resolve(SloAsk(tpot_ms=50)) == RequestSlo(CUSTOM, SloTargets(None, 0.05))
    # nothing asked: the default class; with no default, no SLO at all
    assert DEFAULTS.resolve(SloAsk()) == RequestSlo("standard", SloTargets(2.0, 0.2))
    assert SloClasses().resolve(SloAsk()) is None
    assert DEFAULTS.names == ["interactive", "standard", "batch", CUSTOM]


@pytest.mark.parametrize(
    ("ask", "field"),
    [
        (SloAsk(ttft_ms=0), "ttft_ms"),
        (SloAsk(tpot_ms=-5), "tpot_ms"),
        (SloAsk(deadline_ms=MAX_SLO_MS + 1), "deadline_ms"),
        (SloAsk(ttft_ms=1.5), "ttft_ms"),  # type: ignore[arg-type]
        (SloAsk(ttft_ms=True), "ttft_ms"),
        (SloAsk("premium"), "slo_class"),
        (SloAsk("x" * 5000), "slo_class"),
    ],
)
def test_bad_slo_values_are_refused_naming_the_field(ask, field):
    with pytest.raises(InvalidSlo) as e:
        DEFAULTS.resolve(ask)
    assert e.value.field == field and isinstance(e.value, InvalidSampling)
    assert len(e.value.message) < 200  # a client's long value is not echoed whole


def test_the_core_gets_an_absolute_deadline_implied_by_ttft_and_tpot():
    t = SloTargets(1.0, 0.2)
    assert t.core_slo(100.0, 11) == SLO(100.0 + 1.0 + 0.2 * 10, 1.0, 0.2)  # the sim's rule
    assert t.core_slo(100.0, 1).jct_deadline_s == 101.0
    assert SloTargets(1.0, 0.2, 1.5).core_slo(100.0, 11).jct_deadline_s == 101.5  # tighter
    assert SloTargets(ttft_s=1.0).core_slo(0.0, 5).jct_deadline_s == math.inf  # as the sim
    assert SloTargets(deadline_s=3.0).core_slo(7.0, 5).jct_deadline_s == 10.0


def test_settings_configure_the_classes_and_the_default():
    s = SchedulerSettings.load([], environ={})
    assert s.default_slo_class == "standard"
    assert s.slo_table().as_dict()["batch"] == {"ttft_s": 20.0, "tpot_s": 1.0}
    env = {"ECOSERVE_SLO_CLASSES": '{"gold": {"ttft_ms": 250}, "bulk": {"deadline_ms": 60000}}'}
    s = SchedulerSettings.load(["--default-slo-class", "bulk"], environ=env)
    table = s.slo_table()
    assert table.default == "bulk" and table.names == ["gold", "bulk", CUSTOM]
    assert table.resolve(SloAsk()) == RequestSlo("bulk", SloTargets(deadline_s=60.0))
    assert SchedulerSettings.load(["--default-slo-class", ""], environ={}).slo_table().default == ""
    for argv in (
        ["--slo-classes", "{nope"],
        ["--slo-classes", '{"a": {"ttft_ms": 0}}'],
        ["--slo-classes", '{"a": {"ttft": 5}}'],
        ["--slo-classes", '{"custom": {"ttft_ms": 5}}'],  # the label of explicit-only requests
        ["--slo-classes", '{"a": {}}'],
        ["--default-slo-class", "platinum"],
    ):
        with pytest.raises(SystemExit, match="slo"):
            SchedulerSettings.load(argv, environ={})


# ---- the Frontend: the SLO on the core's Request ---------------------------------------------


def test_the_frontend_puts_the_slo_on_the_core_request_and_the_class_on_the_handle():
    engine = FakeEngine(hold=True)
    fe = frontend_with(engine)
    sp = SamplingParams(max_tokens=8)
    t0 = fe.clock()
    handle, _ = fe.start(GenerateParams("hi", sampling=sp, slo=SloAsk("interactive")))
    req = engine.submitted[-1]
    # predicted length: the default 256 capped at max_tokens 8 -> deadline 1 + 0.2 x 7 after
    # the request was received (the core's clock), TTFT and TPOT carried as they are
    assert (req.slo.ttft_s, req.slo.tpot_s) == (1.0, 0.2)
    assert t0 - 1e-6 <= req.slo.jct_deadline_s - 2.4 <= req.arrival_s + 1e-6
    assert handle.slo == RequestSlo("interactive", SloTargets(1.0, 0.2)) and handle.received_s
    # received_s from the edge is where the deadline counts from
    fe.start(GenerateParams("hi", sampling=sp, slo=SloAsk(deadline_ms=500), received_s=5.0))
    assert engine.submitted[-1].slo == SLO(5.5, None, None)
    # no classes configured and nothing asked: no SLO (as before)
    bare = FakeEngine(hold=True)
    frontend_with(bare, None).start(GenerateParams("hi", sampling=sp))
    assert bare.submitted[-1].slo == SLO()
    with pytest.raises(InvalidSlo):
        fe.start(GenerateParams("hi", sampling=sp, slo=SloAsk("nope")))
    assert len(engine.submitted) == 2


def test_ends_are_counted_per_class_failed_missed_aborted_not_counted():
    fe = frontend_with()
    h = RequestHandle("r", slo=RequestSlo("interactive", SloTargets(1.0, 0.2)), received_s=0.0)
    fe.clock = lambda: 10.0  # ended at 10 s: the deadline-free targets judge TTFT and TPOT only
    fe.record_slo(h, "length", 11, first_s=0.5)  # TTFT 0.5, TPOT 0.95: missed tpot
    fe.record_slo(h, "stop", 1, first_s=0.9)  # one token: TTFT only, met
    fe.record_slo(h, "failed: sampling: NaN", 0, None)
    fe.record_slo(h, "aborted", 3, 0.1)  # the client left: not counted
    fe.record_slo(RequestHandle("plain"), "length", 3, 0.1)  # no SLO: not counted
    row = fe.slo_stats()["classes"]["interactive"]
    assert (row["requests"], row["met"], row["missed_tpot"], row["missed_failed"]) == (3, 1, 1, 1)
    assert row["targets"] == {"ttft_s": 1.0, "tpot_s": 0.2}
    assert fe.stats()["slo"]["default_class"] == "standard"


# ---- HTTP ------------------------------------------------------------------------------------


class SlowFirstToken(FakeEngine):
    """Each request's tokens (and "length") come `delay_s` after it is submitted."""

    def __init__(self, delay_s: float = 0.05) -> None:
        super().__init__(hold=True)
        self.delay_s = delay_s

    def submit(self, request):
        handle = super().submit(request)
        threading.Timer(self.delay_s, self.run, [request.request_id]).start()
        return handle


@pytest.fixture
def http():
    openai = pytest.importorskip("openai")
    from fastapi.testclient import TestClient

    from ecoserve_scheduler.live.http_api import create_app

    made = []

    def start(engine=None):
        engine = engine or FakeEngine()
        fe = frontend_with(engine)
        raw = TestClient(create_app(fe, "tiny")).__enter__()
        made.append(raw)
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=raw, max_retries=0
        )
        return client, raw, engine, fe

    yield start
    for raw in made:
        raw.__exit__(None, None, None)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("ecoserve", "param", "words"),
    [
        ({"ttft_ms": 0}, "ecoserve.ttft_ms", "ecoserve.ttft_ms must be in [1, 86400000]"),
        ({"tpot_ms": -3}, "ecoserve.tpot_ms", "ecoserve.tpot_ms must be in"),
        ({"deadline_ms": 10**12}, "ecoserve.deadline_ms", "ecoserve.deadline_ms must be in"),
        ({"ttft_ms": "soon"}, "ecoserve.ttft_ms", "ecoserve.ttft_ms"),  # typed
        ({"slo_class": "premium"}, "ecoserve.slo_class", "not an SLO class of this server"),
        ({"priority": 1}, "ecoserve.priority", "unrecognized request argument"),  # declared only
    ],
)
def test_http_refuses_a_bad_slo_field_naming_it(http, route, ecoserve, param, words):
    _, raw, engine, _ = http()
    body = {"model": "tiny", "max_tokens": 2, "ecoserve": ecoserve}
    body |= {"prompt": "hi"} if route == "/v1/completions" else {"messages": USER}
    r = raw.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error"
    assert engine.submitted == []


def test_http_slo_reaches_the_core_request_through_the_openai_client(http):
    client, _, engine, _ = http()
    client.completions.create(
        model="tiny",
        prompt="hi",
        max_tokens=4,
        extra_body={"ecoserve": {"slo_class": "batch", "ttft_ms": 5000}},
    )
    req = engine.submitted[-1]
    assert (req.slo.ttft_s, req.slo.tpot_s) == (5.0, 1.0)
    assert req.slo.jct_deadline_s == pytest.approx(req.arrival_s + 5.0 + 1.0 * 3, abs=0.5)
    client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=4, extra_body={"ecoserve": {"deadline_ms": 800}}
    )
    req = engine.submitted[-1]
    assert (req.slo.ttft_s, req.slo.tpot_s) == (None, None)
    assert req.slo.jct_deadline_s == pytest.approx(req.arrival_s + 0.8, abs=0.5)
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, n=2)  # default class
    for req in engine.submitted[-2:]:
        assert (req.slo.ttft_s, req.slo.tpot_s) == (2.0, 0.2)


def test_priority_is_still_refused_and_points_at_the_slo_fields(http):
    _, raw, engine, _ = http()
    r = raw.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "priority": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"
    assert "ecoserve" in r.json()["error"]["message"] and engine.submitted == []


def metric(text: str, name: str, **labels) -> float | None:
    """The value of one sample of the Prometheus text `text`, None if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_prometheus_counts_met_and_missed_per_class(http):
    client, raw, _, fe = http(SlowFirstToken(0.05))
    impossible = {"ecoserve": {"ttft_ms": 1}}  # the first token takes >= 50 ms: missed
    client.completions.create(model="tiny", prompt="hi", max_tokens=3, extra_body=impossible)
    easy = {"ecoserve": {"slo_class": "batch"}}  # TTFT 20 s, TPOT 1 s: met
    client.completions.create(model="tiny", prompt="hi", max_tokens=3, extra_body=easy)
    stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "EEE"
    text = raw.get("/metrics").text
    assert metric(text, "ecoserve_slo_requests_total", slo_class="custom") == 1
    assert metric(text, "ecoserve_slo_met_total", slo_class="custom") == 0
    assert metric(text, "ecoserve_slo_missed_total", slo_class="custom", target="ttft") == 1
    assert metric(text, "ecoserve_slo_missed_total", slo_class="custom", target="tpot") == 0
    assert metric(text, "ecoserve_slo_attainment", slo_class="custom") == 0
    for cls in ("batch", "standard"):  # standard: the streamed chat, the default class
        assert metric(text, "ecoserve_slo_requests_total", slo_class=cls) == 1
        assert metric(text, "ecoserve_slo_met_total", slo_class=cls) == 1
        assert metric(text, "ecoserve_slo_attainment", slo_class=cls) == 1
    assert metric(text, "ecoserve_slo_requests_total", slo_class="interactive") == 0
    assert metric(text, "ecoserve_slo_attainment", slo_class="interactive") is None  # no 0/0
    assert metric(text, "ecoserve_slo_target_seconds", slo_class="interactive", target="ttft") == 1
    labels = {
        line.split('slo_class="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("ecoserve_slo_") and "slo_class=" in line
    }
    assert labels == {"interactive", "standard", "batch", CUSTOM}  # bounded: the configuration
    assert fe.stats()["slo"]["classes"]["custom"]["missed_ttft"] == 1  # /stats and gRPC Stats


# ---- gRPC and the SDK ------------------------------------------------------------------------


@pytest.fixture
def grpc_api():
    made = []

    def start(engine=None):
        engine = engine or FakeEngine()
        fe = frontend_with(engine)
        server, port = build_server(SchedulerService(fe), "127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        made.append((server, channel))
        return pb_grpc.SchedulerStub(channel), engine, fe

    yield start
    for server, channel in made:
        channel.close()
        server.stop(0).wait()


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"ttft_ms": MAX_SLO_MS + 1}, "ttft_ms"),
        ({"tpot_ms": 2**32 - 1}, "tpot_ms"),
        ({"deadline_ms": MAX_SLO_MS + 5}, "deadline_ms"),
        ({"slo_class": "premium"}, "slo_class"),
    ],
)
def test_grpc_refuses_a_bad_slo_field_with_invalid_argument_naming_it(grpc_api, kw, field):
    stub, engine, _ = grpc_api()
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(pb.GenerateRequest(prompt="hi", max_tokens=2, **kw), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: "), e.value.details()
    assert engine.submitted == []


def test_grpc_slo_reaches_the_core_request_and_is_counted(grpc_api):
    stub, engine, fe = grpc_api()
    m = pb.GenerateRequest(prompt="hi", max_tokens=3, slo_class="interactive", tpot_ms=400)
    assert stub.Complete(m, timeout=10).finish_reason == "length"
    req = engine.submitted[-1]
    assert (req.slo.ttft_s, req.slo.tpot_s) == (1.0, 0.4)
    assert req.slo.jct_deadline_s == pytest.approx(req.arrival_s + 1.0 + 0.4 * 2, abs=0.5)
    chunks = list(stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=2), timeout=10))
    assert chunks[-1].finish_reason == "length"
    assert engine.submitted[-1].slo.ttft_s == 2.0  # nothing asked: the default class
    slo = json.loads(stub.Stats(pb.StatsRequest(), timeout=10).json)["slo"]["classes"]
    assert (slo["interactive"]["requests"], slo["interactive"]["met"]) == (1, 1)
    assert slo["standard"]["requests"] == 1


def test_the_sdk_sends_the_slo_fields():
    from ecoserve_client.client import _request

    m = _request("hi", slo_class="batch", ttft_ms=300, deadline_ms=60_000)
    assert (m.slo_class, m.ttft_ms, m.tpot_ms, m.deadline_ms) == ("batch", 300, 0, 60_000)
    for bad in ({"ttft_ms": -1}, {"tpot_ms": MAX_SLO_MS + 1}, {"deadline_ms": 1.5}):
        with pytest.raises(InvalidSampling):
            _request("hi", **bad)


# ---- the engine core in its own process --------------------------------------------------------


def test_the_slo_survives_the_engine_process_pickle():
    """EngineClient sends ("add", Request) pickled (engine_client._send): the SLO goes along."""
    req = Request(
        "r",
        3,
        10.0,
        SamplingParams(max_tokens=4),
        slo=SLO(12.5, 1.0, 0.2),
        prompt_token_ids=(5, 6, 7),
    )
    got = pickle.loads(pickle.dumps(("add", req), protocol=pickle.HIGHEST_PROTOCOL))[1]
    assert got.slo == SLO(12.5, 1.0, 0.2) and got.request_id == "r"


@pytest.mark.parametrize("policy", ["ecoserve", "vllm"])
def test_a_request_with_a_deadline_overtakes_late_ones_in_the_engine_process(
    model_dir, monkeypatch, policy
):
    """Three requests whose 1 ms deadline has passed, then one with ten minutes, all queued
    in the engine core process before a worker (token budget 128) registers; the prompts are
    100 tokens, so one prompt per step. The ecoserve policy reads the SLO on the far side of
    the process boundary: the on-time request's first token comes first. vLLM's FIFO serves
    arrival order. Each end is counted against its SLO (custom: explicit targets only)."""
    pytest.importorskip("torch")
    from test_live_engine import start_worker, wait_for

    from ecoserve_scheduler.live.engine_client import EngineClient

    order: list[str] = []
    receive = RequestHandle.receive

    def recording(self, ev):
        if isinstance(ev, TokenEvent) and not self.tokens:
            order.append(self.request_id)
        receive(self, ev)

    monkeypatch.setattr(RequestHandle, "receive", recording)
    engine = EngineClient(policy, auth_token="k", worker_timeout_s=10.0).start()
    worker = None
    try:
        fe = frontend_with(engine, queue_without_workers=True)
        sp = SamplingParams(max_tokens=4, ignore_eos=True)
        handles = []
        asks = (("late0", 1), ("late1", 1), ("late2", 1), ("ontime", 600_000))
        for i, (rid, ms) in enumerate(asks):
            ids = tuple(range(10 + i, 110 + i))
            slo = SloAsk(deadline_ms=ms)
            p = GenerateParams(prompt_token_ids=ids, sampling=sp, request_id=rid, slo=slo)
            handles.append(fe.start(p)[0])
        time.sleep(0.05)  # every add is in the core before the worker comes
        worker = start_worker(engine.address, "w0", model_dir)
        for h in handles:
            list(fe.follow(h, timeout_s=120))
            assert h.finish_reason == "length", h.finish_reason
        expected_first = "ontime" if policy == "ecoserve" else "late0"
        assert order[0] == expected_first, order
        row = fe.slo_stats()["classes"][CUSTOM]
        assert (row["requests"], row["met"], row["missed_deadline"]) == (4, 1, 3)
        wait_for(lambda: engine.pending == 0)
    finally:
        if worker is not None:
            worker.kill()
            worker.wait()
        engine.stop()
