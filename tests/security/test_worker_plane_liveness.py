"""Finding 8 (worker plane): a dead worker was noticed only after 10 s, and a worker
re-registered 19 times in 20 ms.

Now: workers heartbeat every 0.5 s (during steps too), the scheduler drops one silent for 2 s,
plus twice its slowest step while one is in flight; a Register from the same process (same key,
same incarnation) is only acknowledged, a new incarnation replaces the old state; a worker sends
one Register while one is unanswered, however many "unregistered" replies arrive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

zmq = pytest.importorskip("zmq")

from test_worker_plane import (  # noqa: E402
    TOKEN,
    WAIT_S,
    ThreadWorker,
    received,
    register,
    submit,
    wait_for,
)

from ecoserve_common.pb import worker_pb2 as pb  # noqa: E402
from ecoserve_common.wire import decode, encode  # noqa: E402
from ecoserve_scheduler.core import SchedulerCore, make_policy  # noqa: E402
from ecoserve_scheduler.live import LiveEngine  # noqa: E402
from ecoserve_worker.backends import EchoBackend  # noqa: E402


@pytest.fixture
def engine():
    made = []

    def start(**kw) -> LiveEngine:
        e = LiveEngine(SchedulerCore(make_policy("vllm")), auth_token=TOKEN, **kw).start()
        made.append(e)
        return e

    yield start
    for e in made:
        e.stop()


def test_a_killed_worker_is_dropped_within_about_two_seconds(engine):
    """Defaults on both sides (scheduler timeout 2 s, worker heartbeat 0.5 s): kill -9 of an
    idle worker process is noticed in ~2 s, not 10."""
    e = engine()  # the default worker_timeout_s
    cmd = [sys.executable, "-m", "ecoserve_worker", "--scheduler", e.address, "--worker-id"]
    cmd += ["w0", "--echo", "--insecure"]  # the engine above has no keys: a test shortcut
    proc = subprocess.Popen(cmd, env=dict(os.environ, ECOSERVE_WORKER_AUTH_TOKEN=TOKEN))
    try:
        wait_for(lambda: e.worker_ids() == ["w0"])
        time.sleep(1.5)  # idle, heartbeating: not dropped
        assert e.worker_ids() == ["w0"]
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: e.worker_ids() == [], timeout=15)
        assert time.monotonic() - killed < 3.5
    finally:
        proc.kill()
        proc.wait()


class SlowFirstStep(EchoBackend):
    """An echo backend whose first step takes `seconds` (a long prefill)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(64, 16, 128)
        self.seconds = seconds

    def execute(self, plan):
        if self.seconds:
            time.sleep(self.seconds)
            self.seconds = 0.0
        return super().execute(plan)


def test_a_long_step_is_not_taken_for_a_dead_worker(engine):
    """A 3 s first step against a 1 s timeout: the worker heartbeats while it computes, so it
    is not dropped and the request finishes."""
    e = engine(worker_timeout_s=1.0)
    worker = ThreadWorker(e.address, backend=SlowFirstStep(3.0), heartbeat_s=0.25)
    try:
        wait_for(lambda: e.worker_ids() == ["w0"])
        h = submit(e, "long-prefill", max_tokens=4)
        assert h.wait(WAIT_S) and h.finish_reason == "length" and len(h.tokens) == 4
        assert e.workers_dropped == 0 and e.worker_ids() == ["w0"]
    finally:
        worker.stop()


def test_registration_is_idempotent_and_a_new_incarnation_replaces_the_old(engine):
    e = engine(worker_timeout_s=10.0)  # this raw peer does not heartbeat
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(e.address)
    try:
        sock.send(encode("w0", register("first")))
        assert [env.registered.accepted for env, _ in received(sock, 0.5)] == [True]
        h = submit(e, "held", max_tokens=3)
        plan = next(env.plan for env, body in received(sock, 1.0) if body == "plan")
        for _ in range(3):  # the same process again (a retry): acknowledged, nothing dropped
            sock.send(encode("w0", register("first")))
        got = received(sock, 0.5)
        assert [body for _, body in got] == ["registered"] * 3
        assert e.workers_dropped == 0 and e.worker_ids() == ["w0"]
        n = len(plan.decodes.request_ids) + sum(p.sample for p in plan.prefills)
        sock.send(encode("w0", pb.StepResult(step_id=plan.step_id, tokens=[1] * n)))
        wait_for(lambda: len(h.tokens) == 1)  # its step in flight still counted
        sock.send(encode("w0", register("second")))  # restarted: its old pool is gone
        wait_for(lambda: e.workers_dropped == 1)
        assert e.worker_ids() == ["w0"]
    finally:
        sock.close(0)
        ctx.term()


def test_a_burst_of_unregistered_replies_makes_one_register():
    """The worker's side: 20 "unregistered" errors at once (a restarted scheduler answering
    each of its frames) bring one Register, not 20."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    addr = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    worker = ThreadWorker(addr, heartbeat_s=60.0)
    try:
        assert router.poll(10_000)
        peer, frame = router.recv_multipart()
        assert decode(frame)[1] == "register"
        router.send_multipart([peer, encode("scheduler", pb.Registered(accepted=True))])
        unregistered = encode("scheduler", pb.Error(code="unregistered", message="who?"))
        for _ in range(20):
            router.send_multipart([peer, unregistered])
        bodies = []
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            if router.poll(int(left * 1000)):
                bodies.append(decode(router.recv_multipart()[1])[1])
        assert bodies.count("register") == 1, bodies
        assert worker.server.registers_sent == 2  # the first one, and this one
    finally:
        worker.stop()
        router.close(0)
        ctx.term()
