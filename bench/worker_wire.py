"""bench/worker.py's wire measurement: a real batch-B decode plan sent through a `--echo`
worker process over ZeroMQ, and the in-process codec time."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from worker_measure import median_time, prompts_for

REPO = Path(__file__).resolve().parent.parent


def decode_plan(batch: int, prompt_len: int, vocab: int):
    """A real batch-`batch` decode plan from a SchedulerCore (vllm policy)."""
    from ecoserve_scheduler.core import (
        Request,
        SamplingParams,
        SchedulerCore,
        StepResult,
        WorkerSpec,
        make_policy,
    )

    core = SchedulerCore(make_policy("vllm"))
    core.add_worker(
        WorkerSpec("w0", num_blocks=4096, block_size=16, token_budget=4096, max_num_seqs=256)
    )
    for i, p in enumerate(prompts_for(batch, prompt_len, vocab, seed=7)):
        sp = SamplingParams(max_tokens=64)
        core.add(Request(f"r{i}", prompt_len, 0.0, sp, prompt_token_ids=tuple(p)), 0.0)
    for t in range(32):
        plan = core.schedule("w0", float(t)).plan
        if plan is None:
            break
        if len(plan.decodes) == batch and not plan.prefills:
            return plan
        core.update(StepResult(plan.step_id, "w0", [5] * len(plan.sampled_ids())), t + 0.5)
    raise RuntimeError(f"scheduler produced no batch-{batch} decode plan")


def zmq_roundtrip(plan, iters: int) -> dict[str, float]:
    """Median seconds from sending `plan` to holding its decoded StepResult, through a real
    worker process (`ecoserve-worker --echo`: the whole receive -> decode -> execute -> encode
    -> send loop with nothing inside), over tcp on 127.0.0.1 from a ROUTER as the scheduler
    has. Also the in-process codec share: encode + decode of the plan and of the result."""
    import subprocess

    import zmq

    from ecoserve_common.pb import worker_pb2 as pb
    from ecoserve_common.wire import (
        decode,
        encode,
        plan_from_proto,
        plan_to_proto,
        result_from_proto,
        result_to_proto,
    )
    from ecoserve_scheduler.core import StepResult

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    addr = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "services/worker"), str(REPO / "services/scheduler"), env.get("PYTHONPATH", "")]
    )
    cmd = [sys.executable, "-m", "ecoserve_worker", "--scheduler", addr, "--worker-id", "echo"]
    cmd += ["--echo", "--heartbeat-s", "3600", "--log-level", "WARNING", "--insecure"]
    proc = subprocess.Popen(cmd, env=env)

    def recv(body_wanted: str) -> pb.Envelope:
        while True:
            if not router.poll(30_000):
                raise RuntimeError("echo worker did not answer within 30 s")
            peer, frame = router.recv_multipart()
            env_, body = decode(frame)
            if body == body_wanted:
                return peer, env_

    samples = []
    try:
        peer, _ = recv("register")
        router.send_multipart([peer, encode("scheduler", pb.Registered(accepted=True))])
        for i in range(iters + 20):
            t0 = time.perf_counter()
            router.send_multipart([peer, encode("scheduler", plan_to_proto(plan))])
            _, env_ = recv("result")
            res = result_from_proto(env_.result, "echo")
            dt = time.perf_counter() - t0
            assert len(res.tokens) == len(plan.sampled_ids())
            if i >= 20:
                samples.append(dt)
        router.send_multipart([peer, encode("scheduler", pb.Shutdown())])
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        router.close()
        ctx.term()

    result = StepResult(plan.step_id, "w0", [1] * len(plan.sampled_ids()), 0.0)

    def codec() -> None:
        env_, _ = decode(encode("scheduler", plan_to_proto(plan)))
        plan_from_proto(env_.plan, "w0")
        env_, _ = decode(encode("w0", result_to_proto(result)))
        result_from_proto(env_.result, "w0")

    codec_s = median_time(codec, 200, "cpu")
    return {"roundtrip_s": float(statistics.median(samples)), "codec_s": codec_s}
