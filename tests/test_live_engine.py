"""LiveEngine against real worker processes (tiny model, CPU) on loopback.

Greedy outputs through the whole stack (core -> ZeroMQ -> worker -> model) must equal greedy
decoding straight on a ModelRunner; killing one of two workers with SIGKILL mid-run must not
lose any request; bad auth is refused; garbage frames get an Error and change nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
zmq = pytest.importorskip("zmq")
torch = pytest.importorskip("torch")

from ecoserve_common.pb import worker_pb2 as pb  # noqa: E402
from ecoserve_common.wire import decode, encode  # noqa: E402
from ecoserve_scheduler.core import Request, SamplingParams, SchedulerCore, make_policy  # noqa: E402
from ecoserve_scheduler.live import LiveEngine  # noqa: E402
from ecoserve_worker.model_runner import ModelRunner, greedy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 12
WAIT_S = 120  # only reached when something is broken


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(4, 500, (int(n),), generator=g).tolist() for n in range(5, 45, 2)]


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    runner = ModelRunner(model_dir, num_blocks=16, block_size=16)
    out = []
    for p in prompts:
        toks = greedy(runner.step([("r", p, 0, list(range(16)))]))
        while len(toks) < MAX_TOKENS:
            toks += greedy(
                runner.step([("r", [toks[-1]], len(p) + len(toks) - 1, list(range(16)))])
            )
        out.append(toks)
    return out


def start_worker(
    addr: str, wid: str, model_dir, token: str = "k", num_blocks: int = 64, keys_dir=None
) -> subprocess.Popen:
    """A real worker process on the tiny model. The secret goes in its environment (never its
    argv); with `keys_dir` it speaks CURVE with those keys, else it runs --insecure (against a
    LiveEngine built without keys, the tests' in-process default)."""
    path = [str(REPO / "services/worker"), str(REPO / "services/scheduler")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]))
    env["ECOSERVE_WORKER_AUTH_TOKEN"] = token
    cmd = [sys.executable, "-m", "ecoserve_worker", "--scheduler", addr, "--worker-id", wid]
    cmd += ["--model", str(model_dir), "--num-blocks", str(num_blocks), "--block-size", "16"]
    cmd += ["--no-profile", "--token-budget", "128", "--heartbeat-s", "0.2"]
    cmd += ["--keys-dir", str(keys_dir)] if keys_dir else ["--insecure"]
    cmd += ["--dtype", "float32"]  # the references are fp32 (bf16 is the default on some CPUs)
    return subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)


def wait_for(pred, timeout: float = WAIT_S) -> None:
    import threading

    ev = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if pred():
            return
        ev.wait(0.05)
    raise AssertionError("condition not reached")


@pytest.fixture
def stack(model_dir):
    made = []

    def start(policy: str = "vllm", workers=("w0",), timeout_s: float = 10.0, blocks: int = 64):
        engine = LiveEngine(
            SchedulerCore(make_policy(policy)), auth_token="k", worker_timeout_s=timeout_s
        ).start()
        procs = {w: start_worker(engine.address, w, model_dir, num_blocks=blocks) for w in workers}
        made.append((engine, procs))
        wait_for(lambda: sorted(engine.worker_ids()) == sorted(workers))
        return engine, procs

    yield start
    for engine, procs in made:
        for p in procs.values():
            p.kill()
            p.wait()
        engine.stop()


def submit_all(engine, prompts, policy_kw=None):
    handles = []
    for i, p in enumerate(prompts):
        sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        handles.append(engine.submit(Request(f"q{i}", len(p), 0.0, sp, prompt_token_ids=tuple(p))))
    return handles


@pytest.mark.parametrize("policy", ["vllm", "ecoserve"])
def test_outputs_equal_direct_greedy(stack, prompts, reference, policy):
    engine, _ = stack(policy, workers=("w0", "w1"))
    handles = submit_all(engine, prompts)
    for h, ref in zip(handles, reference, strict=True):
        assert h.wait(WAIT_S), h.request_id
        assert h.finish_reason == "length" and h.tokens == ref


def test_sigkill_of_a_worker_loses_no_request(stack, prompts, reference):
    # 24 blocks each: the 20 requests (~50 blocks) cannot all fit on one worker.
    engine, procs = stack("vllm", workers=("w0", "w1"), timeout_s=1.0, blocks=24)
    handles = submit_all(engine, prompts)
    wait_for(lambda: engine._workers["w1"].steps > 0)  # w1 is serving some of them
    procs["w1"].send_signal(signal.SIGKILL)
    for h, ref in zip(handles, reference, strict=True):
        assert h.wait(WAIT_S), h.request_id
        assert h.finish_reason == "length" and h.tokens == ref
    assert engine.workers_dropped == 1 and engine.worker_ids() == ["w0"]


def test_bad_auth_is_refused_and_garbage_gets_errors(stack, model_dir):
    engine, _ = stack("vllm", workers=("w0",))
    intruder = start_worker(engine.address, "evil", model_dir, token="wrong")
    assert intruder.wait(60) == 1  # EXIT_REFUSED
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"stranger")
    sock.connect(engine.address)
    try:
        sock.send(b"\x00garbage\xff")
        assert sock.poll(10_000)
        env, body = decode(sock.recv())
        assert body == "error" and env.error.code == "malformed"
        sock.send(encode("stranger", pb.Heartbeat(sent_s=1.0)))
        assert sock.poll(10_000)
        env, body = decode(sock.recv())
        assert body == "error" and env.error.code == "unregistered"
    finally:
        sock.close(0)
        ctx.term()
    assert engine.worker_ids() == ["w0"]
    (h,) = submit_all(engine, [[5, 6, 7]])
    assert h.wait(WAIT_S) and len(h.tokens) == MAX_TOKENS


def test_cancel_frees_kv_blocks_within_an_iteration(stack):
    """A cancelled request's blocks are back in the pool before the worker's next step ends:
    at most the step already in flight completes after the cancel."""
    engine, _ = stack("vllm", workers=("w0",))
    sp = SamplingParams(max_tokens=400, ignore_eos=True)
    h = engine.submit(Request("long", 8, 0.0, sp, prompt_token_ids=tuple(range(10, 18))))
    wait_for(lambda: len(h.tokens) >= 5)
    steps_at_cancel = engine.steps
    engine.cancel("long")
    assert h.wait(WAIT_S) and h.finish_reason == "aborted"
    # At most: the step in flight at cancel, one dispatched before the loop read its inbox,
    # and that one's result landing before this thread reads the counter.
    assert engine.steps - steps_at_cancel <= 3
    wait_for(lambda: engine.stats_snapshot["kv"]["w0"]["blocks_used"] == 0)
    assert len(h.tokens) < 400
