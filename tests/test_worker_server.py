"""The worker process loop against a fake scheduler (a ZeroMQ ROUTER in the test).

The WorkerServer runs in a thread; the test plays the scheduler: registration, plans built by a
real SchedulerCore executed on the tiny model (tokens equal greedy decoding done directly with
the runner), bad frames answered with Error codes without killing the worker, drain, shutdown,
re-registration, and the real CLI process. The backends on their own and the CLI's arguments:
test_worker_backends.py.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
zmq = pytest.importorskip("zmq")
torch = pytest.importorskip("torch")

from ecoserve_common.pb import worker_pb2 as pb  # noqa: E402
from ecoserve_common.wire import (  # noqa: E402
    PROTOCOL_VERSION,
    decode,
    encode,
    plan_to_proto,
    result_from_proto,
)
from ecoserve_scheduler.core import (  # noqa: E402
    Request,
    SamplingParams,
    SchedulerCore,
    WorkerSpec,
    make_policy,
)
from ecoserve_worker.backends import EchoBackend, ModelBackend, SimBackend  # noqa: E402
from ecoserve_worker.model_runner import ModelRunner, greedy  # noqa: E402
from ecoserve_worker.server import EXIT_OK, EXIT_REFUSED, WorkerServer  # noqa: E402

BLOCK = 4
NUM_BLOCKS = 64
BUDGET = 16  # smaller than the long prompt: its prefill is chunked
MAX_TOKENS = 8
PROFILE = "llama-2-7b/a100-80gb"
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 5000  # a frame the test waits for; only reached when something is broken


@pytest.fixture(scope="module")
def runner(model_dir):
    return ModelRunner(model_dir, num_blocks=NUM_BLOCKS, block_size=BLOCK)


class FakeScheduler:
    """A ROUTER on a random local port that talks to one worker."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.addr = f"tcp://127.0.0.1:{port}"
        self.peer: bytes | None = None
        self.last_env: pb.Envelope | None = None

    def recv(self, skip_heartbeats: bool = True) -> tuple[pb.Envelope, str]:
        while True:
            assert self.sock.poll(TIMEOUT_MS), "worker sent nothing"
            self.peer, frame = self.sock.recv_multipart()
            env, body = decode(frame)
            self.last_env = env
            if not (skip_heartbeats and body == "heartbeat"):
                return env, body

    def send(self, body) -> None:
        self.send_raw(encode("scheduler", body))

    def send_raw(self, frame: bytes) -> None:
        self.sock.send_multipart([self.peer, frame])

    def accept(self) -> pb.Register:
        env, body = self.recv()
        assert body == "register"
        self.send(pb.Registered(accepted=True))
        return env.register


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def serve(ctx):
    """Start a WorkerServer thread against a fresh FakeScheduler; join it at teardown."""
    started: list[tuple[WorkerServer, threading.Thread]] = []

    def start(backend, **kw) -> tuple[FakeScheduler, WorkerServer, threading.Thread, dict]:
        sched = FakeScheduler(ctx)
        kw.setdefault("heartbeat_s", 60.0)
        server = WorkerServer(sched.addr, "w0", backend, context=ctx, poll_s=0.01, **kw)
        out: dict = {}
        thread = threading.Thread(target=lambda: out.setdefault("rc", server.run()), daemon=True)
        thread.start()
        started.append((server, thread))
        return sched, server, thread, out

    yield start
    for server, thread in started:
        server.stop()
        thread.join(5)
        assert not thread.is_alive()


def make_core(prompts: dict[str, list[int]], sampling: SamplingParams | None = None):
    core = SchedulerCore(make_policy("vllm"))
    core.add_worker(WorkerSpec("w0", NUM_BLOCKS, BLOCK, BUDGET))
    sp = sampling or SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    for rid, ids in prompts.items():
        core.add(Request(rid, len(ids), 0.0, sp, prompt_token_ids=tuple(ids)), 0.0)
    return core


def drive(sched: FakeScheduler, core: SchedulerCore, max_steps: int = 100) -> int:
    """Schedule, send each plan to the worker, apply its result; return the steps run."""
    for t in range(max_steps):
        plan = core.schedule("w0", float(t)).plan
        if plan is None or not plan.num_tokens:
            return t
        sched.send(plan_to_proto(plan))
        env, body = sched.recv()
        assert body == "result", env
        result = result_from_proto(env.result, "w0")
        assert not result.error and result.step_id == plan.step_id
        assert len(result.tokens) == len(plan.sampled_ids())
        core.update(result, t + 0.5)
    raise AssertionError("requests did not finish")


def reference_greedy(runner: ModelRunner, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding straight on the runner, in blocks of its own."""
    table = list(range(NUM_BLOCKS - 16, NUM_BLOCKS))
    out = greedy(runner.step([("ref", prompt, 0, table)]))
    while len(out) < n:
        out += greedy(runner.step([("ref", [out[-1]], len(prompt) + len(out) - 1, table)]))
    return out


PROMPTS = {"short": [1, 40, 41, 42, 43, 44], "long": [1, *range(100, 122)]}


def test_registration_carries_backend_info(runner, serve):
    backend = ModelBackend(runner, token_budget=BUDGET, model_id="tiny")
    sched, server, thread, out = serve(backend, auth_token="s3cret")
    reg = sched.accept()
    info = backend.info()
    assert (reg.model_id, reg.block_size, reg.num_blocks) == ("tiny", BLOCK, NUM_BLOCKS)
    assert (reg.token_budget, reg.device, reg.auth_token) == (BUDGET, "cpu", "s3cret")
    assert reg.max_model_len == info["max_model_len"] > 0
    # The ROUTER gives the connection its own routing id; the worker id travels in the frame.
    assert sched.peer != b"w0" and sched.last_env.worker_id == "w0"


def test_refused_registration_exits_with_reason(runner, serve, caplog):
    sched, server, thread, out = serve(SimBackend(PROFILE, 128, sleep=lambda s: None))
    assert sched.recv()[1] == "register"
    with caplog.at_level(logging.ERROR, logger="ecoserve_worker.server"):
        sched.send(pb.Registered(accepted=False, reason="bad auth token"))
        thread.join(5)
    assert out["rc"] == EXIT_REFUSED
    assert "bad auth token" in caplog.text


def test_core_plans_match_direct_greedy(runner, serve):
    expected = {rid: reference_greedy(runner, p, MAX_TOKENS) for rid, p in PROMPTS.items()}
    sched, server, thread, out = serve(ModelBackend(runner, token_budget=BUDGET))
    sched.accept()
    core = make_core(PROMPTS)
    steps = drive(sched, core)
    got = {rid: core.requests[rid].output_token_ids for rid in PROMPTS}
    assert got == expected
    assert steps > MAX_TOKENS  # the long prompt needed more than one prefill chunk
    assert server.steps_done == steps
    sched.send(pb.Shutdown())
    thread.join(5)
    assert not thread.is_alive() and out["rc"] == EXIT_OK


def test_bad_frames_get_error_codes_and_worker_keeps_serving(runner, serve):
    sched, server, thread, out = serve(ModelBackend(runner, token_budget=BUDGET))
    sched.accept()
    sched.send_raw(b"\xff\x00 not protobuf \x13")
    env, body = sched.recv()
    assert body == "error" and env.error.code == "malformed"

    wrong = pb.Envelope(protocol_version=PROTOCOL_VERSION + 7, worker_id="scheduler")
    wrong.heartbeat.sent_s = 1.0
    sched.send_raw(wrong.SerializeToString())
    env, body = sched.recv()
    assert body == "error" and env.error.code == "version"

    bad_plan = pb.BatchPlan(step_id=9, decodes=pb.DecodeBatch(request_ids=["x"], positions=[0]))
    sched.send(bad_plan)
    env, body = sched.recv()
    assert (body, env.error.code, env.error.step_id) == ("error", "invalid", 9)

    sched.send(pb.Error(code="invalid", message="an Error is logged, not answered"))
    sched.send(pb.Register(model_id="not for a worker"))
    env, body = sched.recv()
    assert body == "error" and env.error.code == "unknown"

    core = make_core({"short": PROMPTS["short"]})
    assert drive(sched, core) == MAX_TOKENS
    assert thread.is_alive()


def test_heartbeat_is_echoed_and_sent_when_idle(runner, serve):
    sched, server, thread, out = serve(SimBackend(PROFILE, 128, sleep=lambda s: None))
    sched.accept()
    sched.send(pb.Heartbeat(sent_s=123.5))
    env, body = sched.recv(skip_heartbeats=False)
    assert body == "heartbeat" and env.heartbeat.sent_s == 123.5

    sched2, server2, thread2, out2 = serve(
        SimBackend(PROFILE, 128, sleep=lambda s: None), heartbeat_s=0.02
    )
    sched2.accept()
    env, body = sched2.recv(skip_heartbeats=False)  # unprompted
    assert body == "heartbeat" and env.heartbeat.sent_s > 0


def test_drain_refuses_later_plans_then_shutdown(runner, serve):
    sched, server, thread, out = serve(ModelBackend(runner, token_budget=BUDGET))
    sched.accept()
    core = make_core({"short": PROMPTS["short"]})
    plan = core.schedule("w0", 0.0).plan
    sched.send(plan_to_proto(plan))
    sched.send(pb.Drain())
    sched.send(plan_to_proto(plan))
    env, body = sched.recv()
    assert body == "result" and len(env.result.tokens) == 1  # the step before Drain runs
    env, body = sched.recv()
    assert (body, env.error.code, env.error.step_id) == ("error", "draining", plan.step_id)
    sched.send(pb.Heartbeat(sent_s=2.0))  # a draining worker still answers
    assert sched.recv(skip_heartbeats=False)[1] == "heartbeat"
    sched.send(pb.Shutdown())
    thread.join(5)
    assert not thread.is_alive() and out["rc"] == EXIT_OK


@pytest.mark.parametrize("registered", [True, False])
def test_stop_ends_run(serve, registered):
    sched, server, thread, out = serve(SimBackend(PROFILE, 128, sleep=lambda s: None))
    if registered:
        sched.accept()
        sched.send(pb.Heartbeat(sent_s=1.0))  # answered only once serving: registration is done
        assert sched.recv(skip_heartbeats=False)[1] == "heartbeat"
    else:
        assert sched.recv()[1] == "register"  # never answered
    server.stop()
    thread.join(5)
    assert not thread.is_alive() and out["rc"] == EXIT_OK


def test_unregistered_error_makes_the_worker_register_again(serve):
    """A restarted scheduler answers an unknown worker with "unregistered"; the worker
    registers again and goes on serving, and stops if the new scheduler refuses it."""
    sched, server, thread, out = serve(EchoBackend(NUM_BLOCKS, BLOCK, BUDGET))
    sched.accept()
    sched.send(pb.Error(code="unregistered", message="unknown worker w0"))
    assert sched.accept().num_blocks == NUM_BLOCKS
    core = make_core({"short": PROMPTS["short"]})
    assert drive(sched, core) == MAX_TOKENS
    sched.send(pb.Error(code="unregistered", message="restarted again"))
    assert sched.recv()[1] == "register"
    sched.send(pb.Registered(accepted=False, reason="pool too small"))
    thread.join(5)
    assert not thread.is_alive() and out["rc"] == EXIT_REFUSED


def test_cli_process_serves_and_exits_on_sigterm(ctx):
    """The real CLI (sim backend, no torch import) registers, runs a plan, exits 0 on SIGTERM."""
    sched = FakeScheduler(ctx)
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'services/worker'}:{REPO / 'services/scheduler'}")
    cmd = [sys.executable, "-m", "ecoserve_worker", "--scheduler", sched.addr, "--worker-id"]
    cmd += ["w0", "--sim", PROFILE, "--num-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK)]
    cmd += ["--insecure"]  # the fake scheduler is a plain ROUTER
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert sched.accept().device == "sim"
        plan = make_core(PROMPTS).schedule("w0", 0.0).plan
        sched.send(plan_to_proto(plan))
        env_, body = sched.recv()
        assert body == "result" and list(env_.result.tokens) == [1] * len(plan.sampled_ids())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM" in err
