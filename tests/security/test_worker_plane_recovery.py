"""Finding 2 (engine part): an exception inside the engine loop stopped it silently while
/health still said 200, and the requests it held hung.

Now: anything unexpected in the loop marks the engine dead (`failure`, which /health reports),
fails every request it held with the reason and new ones at once; the EngineClient then starts a
fresh engine core process with backoff, and workers register with it again on their own.
"""

from __future__ import annotations

import os
import signal

import pytest

zmq = pytest.importorskip("zmq")

from test_worker_plane import (  # noqa: E402
    TOKEN,
    WAIT_S,
    ThreadWorker,
    keys_dir,  # noqa: F401 (fixture)
    submit,
    wait_for,
)

from ecoserve_common.curve import WorkerKeys  # noqa: E402
from ecoserve_scheduler.core import SchedulerCore, make_policy  # noqa: E402
from ecoserve_scheduler.live import LiveEngine  # noqa: E402
from ecoserve_scheduler.live.engine_client import EngineClient  # noqa: E402
from ecoserve_scheduler.live.engine_core import CRASH_ENV  # noqa: E402


def test_an_exception_in_the_loop_fails_held_requests_and_reports_the_engine_dead():
    engine = LiveEngine(SchedulerCore(make_policy("vllm")), auth_token=TOKEN).start()
    worker = ThreadWorker(engine.address)
    try:
        wait_for(lambda: engine.worker_ids() == ["w0"])
        held = submit(engine, "held", max_tokens=10_000)
        wait_for(lambda: len(held.tokens) > 3)
        schedule = engine.core.schedule

        def broken(*a, **kw):
            raise RuntimeError("a bug in the policy")

        engine.core.schedule = broken  # the loop's next call raises
        assert held.wait(WAIT_S)
        assert held.finish_reason == "failed: engine loop failed: RuntimeError: a bug in the policy"
        assert engine.failure.startswith("engine loop failed")  # what /health answers 503 with
        assert engine.worker_ids() == [] and engine.pending == 0
        late = submit(engine, "late")
        assert late.done.is_set() and late.finish_reason.startswith("failed: engine loop failed")
        engine.core.schedule = schedule
    finally:
        worker.stop()
        engine.stop()


@pytest.fixture
def client(keys_dir, monkeypatch):  # noqa: F811
    made = []

    def start(crash_after_steps: int | None = None):
        if crash_after_steps is not None:  # read by the first engine core only
            monkeypatch.setenv(CRASH_ENV, str(crash_after_steps))
        engine = EngineClient("vllm", auth_token=TOKEN, worker_keys_dir=str(keys_dir)).start()
        monkeypatch.delenv(CRASH_ENV, raising=False)
        worker = ThreadWorker(engine.address, keys=WorkerKeys.load(keys_dir))
        made.append((engine, worker))
        wait_for(lambda: engine.worker_ids() == ["w0"])
        return engine

    yield start
    for engine, worker in made:
        worker.stop()
        engine.stop()


def served_again(engine: EngineClient, first_pid: int) -> None:
    """The client restarted the core, the worker registered with it, a request runs."""
    wait_for(lambda: engine.failure is None and engine.pid != first_pid)
    wait_for(lambda: engine.worker_ids() == ["w0"])
    h = submit(engine, "after", max_tokens=5)
    assert h.wait(WAIT_S) and h.finish_reason == "length" and len(h.tokens) == 5
    assert engine.restarts == 1


def test_a_killed_engine_core_is_restarted_and_serves_again(client):
    engine = client()
    held = submit(engine, "held", max_tokens=10_000)
    wait_for(lambda: len(held.tokens) > 3)
    first = engine.pid
    os.kill(first, signal.SIGKILL)
    assert held.wait(WAIT_S) and held.finish_reason.startswith("failed: engine core exited")
    served_again(engine, first)


def test_a_crash_inside_the_core_loop_is_reported_and_recovered(client):
    engine = client(crash_after_steps=3)
    first = engine.pid
    held = submit(engine, "held", max_tokens=50)
    assert held.wait(WAIT_S)
    assert held.finish_reason.startswith("failed: engine core failed: engine loop failed:")
    assert "RuntimeError: test crash after" in held.finish_reason and len(held.tokens) < 50
    served_again(engine, first)
