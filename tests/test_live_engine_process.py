"""The engine core in its own process (EngineClient + engine_core) against real workers.

It must serve exactly what the in-process LiveEngine serves (greedy outputs equal a direct
ModelRunner's), cancel, report stats and workers across the process boundary, fail every
request it held when the core process dies (none hangs; health says why), refuse a duplicate
id in flight, and never outlive the front end that started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
zmq = pytest.importorskip("zmq")
pytest.importorskip("torch")

from test_live_engine import (  # noqa: E402
    MAX_TOKENS,
    WAIT_S,
    prompts,  # noqa: F401 (fixture)
    reference,  # noqa: F401 (fixture)
    start_worker,
    submit_all,
    wait_for,
)

from ecoserve_scheduler.core import Request, SamplingParams  # noqa: E402
from ecoserve_scheduler.live.engine_client import EngineClient  # noqa: E402
from ecoserve_scheduler.live.settings import SchedulerSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def proc_stack(model_dir):
    made = []

    def start(policy: str = "vllm", workers=("w0",), **kw):
        engine = EngineClient(policy, auth_token="k", worker_timeout_s=10.0, **kw).start()
        procs = {w: start_worker(engine.address, w, model_dir) for w in workers}
        made.append((engine, procs))
        wait_for(lambda: sorted(engine.worker_ids()) == sorted(workers))
        return engine, procs

    yield start
    for engine, procs in made:
        for p in procs.values():
            p.kill()
            p.wait()
        engine.stop()


@pytest.mark.parametrize("policy", ["vllm", "ecoserve"])
def test_outputs_equal_direct_greedy(proc_stack, prompts, reference, policy):  # noqa: F811
    engine, _ = proc_stack(policy, workers=("w0", "w1"))
    assert engine.pid != os.getpid()
    assert b"k" not in Path(f"/proc/{engine.pid}/cmdline").read_bytes().split(b"\0")  # secret
    handles = submit_all(engine, prompts)
    for h, ref in zip(handles, reference, strict=True):
        assert h.wait(WAIT_S), h.request_id
        assert h.finish_reason == "length" and h.tokens == ref
    wait_for(lambda: engine.pending == 0)
    wait_for(lambda: engine.stats_snapshot["engine"]["steps"] > 0)
    assert engine.failure is None


def test_cancel_and_duplicate_ids_cross_the_process_boundary(proc_stack):
    engine, _ = proc_stack("vllm")
    sp = SamplingParams(max_tokens=400, ignore_eos=True)
    h = engine.submit(Request("long", 8, 0.0, sp, prompt_token_ids=tuple(range(10, 18))))
    twin = engine.submit(Request("long", 8, 0.0, sp, prompt_token_ids=tuple(range(10, 18))))
    assert twin.wait(WAIT_S) and twin.finish_reason.startswith("failed: ")
    assert "already in the system" in twin.finish_reason
    wait_for(lambda: len(h.tokens) >= 5)
    engine.cancel("long")
    assert h.wait(WAIT_S) and h.finish_reason == "aborted" and len(h.tokens) < 400
    wait_for(lambda: engine.stats_snapshot["kv"]["w0"]["blocks_used"] == 0)
    assert engine.pending == 0


def test_a_dead_engine_core_fails_every_held_request_and_says_why(proc_stack):
    engine, _ = proc_stack("vllm", restart=False)  # restarts: tests/security/
    sp = SamplingParams(max_tokens=MAX_TOKENS * 50, ignore_eos=True)
    held = [
        engine.submit(Request(f"h{i}", 8, 0.0, sp, prompt_token_ids=tuple(range(20, 28))))
        for i in range(4)
    ]
    wait_for(lambda: any(h.tokens for h in held))
    os.kill(engine.pid, signal.SIGKILL)
    for h in held:
        assert h.wait(WAIT_S), h.request_id
        assert h.finish_reason.startswith("failed: engine core exited")
    assert engine.failure and "exited" in engine.failure
    assert engine.worker_ids() == [] and engine.pending == 0
    late = engine.submit(Request("late", 8, 0.0, sp, prompt_token_ids=tuple(range(20, 28))))
    assert late.done.is_set() and late.finish_reason.startswith("failed: engine core exited")


def test_the_engine_core_exits_when_its_front_end_is_killed(tmp_path):
    """A front end killed with SIGKILL cannot stop its child: the child notices and exits."""
    script = tmp_path / "front.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, threading
            from ecoserve_scheduler.live.engine_client import EngineClient
            if __name__ == "__main__":
                engine = EngineClient("vllm").start()
                print(engine.pid, flush=True)
                threading.Event().wait()
            """
        )
    )
    front = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(front.stdout.readline())
        assert Path(f"/proc/{child}").exists()
    finally:
        front.kill()
        front.wait()
    wait_for(lambda: not _running(child), timeout=30)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # reparented to init and reaped later: a zombie has exited


def test_engine_process_setting_parses_booleans():
    assert SchedulerSettings.load([]).engine_process is True
    assert SchedulerSettings.load(["--engine-process", "false"]).engine_process is False
    env = {"ECOSERVE_ENGINE_PROCESS": "0"}
    assert SchedulerSettings.load([], environ=env).engine_process is False
    with pytest.raises(SystemExit):  # argparse reports the bad value and exits 2
        SchedulerSettings.load(["--engine-process", "maybe"])
