"""Workers join a running scheduler and leave it without losing a request (issue 21).

A worker joins by registering; it leaves by draining: on SIGTERM (`--drain-timeout-s`) it sends
the scheduler a Drain, the scheduler admits nothing new to it (live/drain.py), what runs there
finishes there, then the scheduler removes it (nothing to recompute) and sends Shutdown. What
Kubernetes does in a rolling update of the workers (deploy/kubernetes/), tested here on plain
processes and threads:

- the core's drain: a draining worker admits nothing, and the others no longer hold a
  request back for it (pure, on the core);
- the worker's side: Drain sent, plans still executed, exit 0 on Shutdown / "unregistered" /
  the deadline; the probe endpoint's answers in each state;
- the engine with two worker threads: a leaving worker finishes its requests, never gets a
  new one, and leaves without a preemption;
- `ecoserve up`'s processes on the tiny model: a third worker joins the running stack, one of
  the first two is sent SIGTERM while requests run on it, and every request finishes.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

zmq = pytest.importorskip("zmq")

from ecoserve_common.pb import worker_pb2 as pb  # noqa: E402
from ecoserve_common.plan import StepResult  # noqa: E402
from ecoserve_common.wire import decode, encode  # noqa: E402
from ecoserve_scheduler.core import (  # noqa: E402
    Request,
    SamplingParams,
    SchedulerCore,
    WorkerSpec,
    make_policy,
)
from ecoserve_scheduler.live import LiveEngine  # noqa: E402
from ecoserve_scheduler.live.drain import Drains  # noqa: E402
from ecoserve_worker.backends import EchoBackend  # noqa: E402
from ecoserve_worker.health import serve_health  # noqa: E402
from ecoserve_worker.server import EXIT_OK, WorkerServer  # noqa: E402

WAIT_S = 120.0  # a deadline only a broken run reaches


def wait_for(pred, timeout_s: float = WAIT_S, what: str = "condition"):
    """Poll `pred` until it returns something truthy (returned); AssertionError at the
    deadline. No timing is asserted: the deadline only stops a broken run."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        tick.wait(0.02)
    raise AssertionError(f"{what} not reached in {timeout_s:g}s")


def request(rid: str, max_tokens: int = 8, prompt_len: int = 16) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, prompt_len, 0.0, sp, prompt_token_ids=tuple(range(1, prompt_len + 1)))


# ---- the drain, on the core ---------------------------------------------------------------------


def test_a_draining_worker_admits_nothing_and_the_others_stop_waiting_for_it():
    core = SchedulerCore(make_policy("vllm"))  # least-loaded placement, the default
    core.add_worker(WorkerSpec("w1", num_blocks=64, block_size=16))
    for i in range(4):
        core.add(request(f"a{i}"), 0.0)
    plan, _ = core.schedule("w1", 0.0)  # the only worker takes all four
    core.update(StepResult(plan.step_id, "w1", [5] * len(plan.sampled_ids())), 0.01)
    core.add_worker(WorkerSpec("w0", num_blocks=64, block_size=16))  # joins, empty
    core.add(request("b"), 0.02)
    plan, _ = core.schedule("w1", 0.02)
    assert "b" not in plan.sampled_ids()  # left for w0, the less loaded one
    core.update(StepResult(plan.step_id, "w1", [5] * len(plan.sampled_ids())), 0.03)

    drains = Drains(core)
    assert drains.start("w0", 0.03) and not drains.start("w0", 0.04)  # a repeat: no change
    assert core.schedule("w0", 0.04).plan is None  # draining, nothing running: takes nothing
    plan, _ = core.schedule("w1", 0.04)  # well within the placement's patience (0.25 s)
    assert "b" in plan.sampled_ids()  # w0 no longer counts as a better place for it
    assert drains.done() == ["w0"] and drains.running() == {"w0": 0}
    drains.left("w0")
    assert drains.drained == 1 and drains.done() == [] and core.stats()["placement"]


# ---- the worker's side --------------------------------------------------------------------------


class Router:
    """The scheduler's end, played by the test: a ROUTER for one worker."""

    def __init__(self, ctx) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.addr = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.peer = b""

    def recv(self) -> tuple[pb.Envelope, str]:
        while True:
            assert self.sock.poll(int(WAIT_S * 1000)), "the worker sent nothing"
            self.peer, frame = self.sock.recv_multipart()
            env, body = decode(frame)
            if body != "heartbeat":
                return env, body

    def send(self, body) -> None:
        self.sock.send_multipart([self.peer, encode("scheduler", body)])


@pytest.fixture
def worker():
    """A WorkerServer thread (echo backend) against a Router; stopped at teardown."""
    ctx = zmq.Context()
    made = []

    def start() -> tuple[Router, WorkerServer, dict]:
        router = Router(ctx)
        server = WorkerServer(router.addr, "w0", EchoBackend(64), context=ctx, poll_s=0.01)
        out: dict = {}
        thread = threading.Thread(target=lambda: out.setdefault("rc", server.run()), daemon=True)
        thread.start()
        made.append((server, thread))
        return router, server, out

    yield start
    for server, thread in made:
        server.stop()
        thread.join(10)
    ctx.destroy(linger=0)


def get(url: str) -> tuple[int, dict]:
    """(status, JSON body; {} for a body that is not JSON, e.g. a 404 page)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            status, data, kind = r.status, r.read(), r.headers.get_content_type()
    except urllib.error.HTTPError as e:
        status, data, kind = e.code, e.read(), e.headers.get_content_type()
    return status, json.loads(data) if kind == "application/json" else {}


def test_a_leaving_worker_sends_drain_keeps_serving_and_exits_on_shutdown(worker):
    router, server, out = worker()
    probes = serve_health("127.0.0.1:0", server.status)
    base = f"http://127.0.0.1:{probes.server_address[1]}"
    try:
        assert router.recv()[1] == "register"
        status, body = get(base + "/readyz")
        assert (status, body["state"], body["worker_id"]) == (503, "registering", "w0")
        router.send(pb.Registered(accepted=True))
        wait_for(lambda: get(base + "/readyz")[0] == 200, what="ready")
        assert get(base + "/livez")[0] == 200 and get(base + "/nope")[0] == 404

        server.leave(60.0)  # what SIGTERM does with --drain-timeout-s
        assert router.recv()[1] == "drain"
        status, body = get(base + "/readyz")
        assert (status, body["state"]) == (503, "leaving")  # no longer counted as available
        assert get(base + "/livez")[0] == 200  # but alive: it is finishing its requests
        # a plan for what still runs here is executed as before
        plan = pb.BatchPlan(step_id=7, prefills=[pb.PrefillChunk(request_id="r", sample=True)])
        plan.prefills[0].token_ids.extend([1, 2, 3])
        plan.prefills[0].block_table.blocks.append(0)
        router.send(plan)
        env, body = router.recv()
        assert body == "result" and env.result.step_id == 7
        router.send(pb.Shutdown())  # the scheduler: drained
        wait_for(lambda: "rc" in out, what="exit")
        assert out["rc"] == EXIT_OK
    finally:
        probes.shutdown()


def test_a_leaving_worker_exits_on_unregistered_before_registration_or_at_its_deadline(worker):
    router, server, out = worker()
    assert router.recv()[1] == "register"
    router.send(pb.Registered(accepted=True))
    wait_for(lambda: server.registered, what="registered")  # leaving before it: plain exit
    server.leave(60.0)
    assert router.recv()[1] == "drain"
    router.send(pb.Error(code="unregistered", message="register first"))  # nothing runs there
    wait_for(lambda: "rc" in out, what="exit")
    assert out["rc"] == EXIT_OK

    router, server, out = worker()
    assert router.recv()[1] == "register"
    server.leave(60.0)  # before it is registered: nothing runs there, it just goes
    wait_for(lambda: "rc" in out, what="exit")
    assert out["rc"] == EXIT_OK

    router, server, out = worker()
    assert router.recv()[1] == "register"
    router.send(pb.Registered(accepted=True))
    wait_for(lambda: server.registered, what="registered")
    server.leave(0.2)  # the scheduler never answers: gone at the deadline
    assert router.recv()[1] == "drain"
    wait_for(lambda: "rc" in out, what="exit")
    assert out["rc"] == EXIT_OK


def test_liveness_fails_when_the_loop_stalls():
    class Stuck:
        def status(self) -> dict:
            return {"state": "ready", "since_loop_s": 61.0}

    probes = serve_health("127.0.0.1:0", Stuck().status)
    try:
        base = f"http://127.0.0.1:{probes.server_address[1]}"
        assert get(base + "/livez")[0] == 503 and get(base + "/readyz")[0] == 200
    finally:
        probes.shutdown()


# ---- the engine with two worker threads ---------------------------------------------------------


class SlowEcho(EchoBackend):
    """Answers every row after a short sleep (so requests run for a while), recording every
    request id it ever ran a row of."""

    def __init__(self) -> None:
        super().__init__(num_blocks=256)
        self.seen: set[str] = set()

    def execute(self, plan):
        self.seen.update(plan.request_ids)
        time.sleep(0.005)
        return super().execute(plan)


def test_the_engine_drains_a_leaving_worker_and_loses_nothing():
    engine = LiveEngine(SchedulerCore(make_policy("ecoserve")), auth_token="k").start()
    backends = {w: SlowEcho() for w in ("w0", "w1")}
    servers = {
        w: WorkerServer(engine.address, w, b, auth_token="k", poll_s=0.01)
        for w, b in backends.items()
    }
    rc: dict = {}
    threads = [
        threading.Thread(target=lambda w=w, s=s: rc.setdefault(w, s.run()), daemon=True)
        for w, s in servers.items()
    ]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sorted(engine.worker_ids()) == ["w0", "w1"], what="registration")
        first = [engine.submit(request(f"a{i}", max_tokens=60)) for i in range(8)]
        wait_for(lambda: engine.stats_snapshot.get("running", {}).get("w0"), what="w0 busy")
        servers["w0"].leave(WAIT_S)
        # the Drain has reached the loop (or w0 has even gone): what is submitted now is not its
        wait_for(lambda: "w0" in engine.drains.draining or "w0" in rc, what="drain")
        second = [engine.submit(request(f"b{i}", max_tokens=20)) for i in range(8)]
        for h in first + second:
            assert h.wait(WAIT_S), h.request_id
            want = 60 if h.request_id.startswith("a") else 20
            assert (h.finish_reason, len(h.tokens)) == ("length", want), h.request_id
        wait_for(lambda: "w0" in rc, what="w0 exit")
        assert rc["w0"] == EXIT_OK and engine.worker_ids() == ["w1"]
        assert backends["w0"].seen & {f"a{i}" for i in range(8)}  # it had work when it left
        assert not backends["w0"].seen & {f"b{i}" for i in range(8)}  # and took none after
        assert engine.drains.drained == 1 and engine.workers_dropped == 0
        assert engine.core.counters.preemptions == 0  # nothing was recomputed elsewhere
    finally:
        for s in servers.values():
            s.stop()
        for t in threads:
            t.join(10)
        engine.stop()


# ---- `ecoserve up`'s processes: join, drain, 0 lost ---------------------------------------------


def test_a_joining_and_a_draining_worker_lose_no_request_in_a_running_stack(tmp_path, monkeypatch):
    """A third worker joins the running stack; one of the first two gets SIGTERM while requests
    run on it; every request finishes, in full, and the store records them all."""
    monkeypatch.setenv("ECOSERVE_KERNELS", "0")  # the torch path: no C++ build on a first start
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("torch")
    from conftest import free_port

    from ecoserve_common.pb import scheduler_pb2
    from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc
    from ecoserve_scheduler.store import RequestStore, make_engine
    from ecoserve_stack.launcher import GRACE_S, build_parser, start_stack

    tokens = 160  # long enough that w0 is still mid-way through its requests when it leaves
    args = build_parser().parse_args(
        [
            *("--model", "tiny", "--workers", "2", "--home", str(tmp_path)),
            *("--grpc-port", str(free_port()), "--http-port", str(free_port())),
            *("--no-predictor", "--token-budget", "256", "--num-blocks", "512"),
            *("--drain-timeout-s", str(WAIT_S)),
        ]
    )
    stack = start_stack(args)
    try:
        channel = grpc.insecure_channel(stack.grpc_address)
        stub = pb_grpc.SchedulerStub(channel)

        def stats() -> dict:
            return json.loads(stub.Stats(scheduler_pb2.StatsRequest(), timeout=10).json)

        # join: a third worker, started as the launcher starts its own, into the running stack
        first = stack.supervisor.services["worker-0"]
        argv = list(first.argv)
        argv[argv.index("--worker-id") + 1] = "w2"
        stack.supervisor.start("worker-2", argv, first.env)
        wait_for(lambda: sorted(stats()["workers"]) == ["w0", "w1", "w2"], what="w2 joined")

        def complete(rid: str, n: int):
            req = scheduler_pb2.GenerateRequest(
                prompt=f"request {rid}", max_tokens=n, ignore_eos=True, request_id=rid
            )
            return stub.Complete.future(req, timeout=WAIT_S)

        calls = {f"j{i}": complete(f"j{i}", tokens) for i in range(24)}
        wait_for(lambda: stats()["running"].get("w0"), what="requests running on w0")
        leaving = stack.procs["worker-0"]
        leaving.send_signal(signal.SIGTERM)  # what a rolling update sends

        def draining() -> dict | None:
            s = stats()
            return s if "w0" in s["draining"] or leaving.poll() is not None else None

        snap = wait_for(draining, what="w0 draining")
        assert snap["draining"].get("w0", 0) > 0  # it left with requests still running there
        assert leaving.wait(WAIT_S) == 0  # drained, then shut down
        calls |= {f"k{i}": complete(f"k{i}", 16) for i in range(6)}  # served by w1, w2

        for rid, call in calls.items():
            done = call.result()
            assert done.finish_reason == "length", rid
            assert len(done.token_ids) == (tokens if rid.startswith("j") else 16), rid
        end = stats()
        assert sorted(end["workers"]) == ["w1", "w2"] and end["draining"] == {}
        assert end["engine"]["workers_drained"] == 1 and end["engine"]["workers_dropped"] == 0
        assert end["preemptions"] == 0 and end["failed"] == 0  # nothing recomputed or failed
        store = RequestStore(make_engine(stack.db_url))
        wait_for(
            lambda: all((r := store.get(rid)) and r.status == "finished" for rid in calls),
            what="every row finished in the store",
        )
        channel.close()
    finally:
        stack.supervisor.stop_all(GRACE_S)
