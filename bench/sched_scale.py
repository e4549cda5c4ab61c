"""Scheduler cost per iteration vs queue length: does planning stay flat as the queue grows?

Builds one worker with `running` decoding requests, puts `queued` more requests in the waiting
queue, then times `schedule()` and `apply()` over many iterations. The queue cannot drain:
for EcoServe because the running requests' reservations fill the KV cache (the head is peeked
every step and does not fit), for the on-demand policies because the batch is at
`max_num_seqs` (their KV use grows every step, so "full" is not a stable state for them).
Writes results/sched-scale/summary.json.

    python bench/sched_scale.py [--running 1000] [--queued 0 1000 10000 100000] [--iters 300]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from ecoserve_scheduler.core import (
    SLO,
    Request,
    SamplingParams,
    SchedulerCore,
    StepResult,
    WorkerSpec,
    make_policy,
)

PROMPT, RL = 100, 800  # running requests: 100-token prompt, 800 tokens reserved (never reached)


def build(policy: str, running: int, queued: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    blocks_per_req = -(-(PROMPT + RL) // 16)
    pol = make_policy(policy)
    kv_bound = pol.name == "ecoserve"
    # EcoServe: exactly the running requests' reservations (+ its reserve pool), so the queue
    # head never fits; others: room to grow, and the batch capped at `running` sequences.
    num_blocks = int(running * blocks_per_req / (1 - pol.reserve_share)) + 1
    spec = WorkerSpec(
        "w0",
        num_blocks=num_blocks if kv_bound else 2 * num_blocks,
        block_size=16,
        token_budget=running + 512,
        max_num_seqs=running + 64 if kv_bound else running,
    )
    core = SchedulerCore(pol)
    core.add_worker(spec)
    true_len: dict[str, int] = {}

    def add(i: int, now: float) -> None:
        rl = int(rng.integers(RL // 2, RL)) if i >= running else RL
        r = Request(
            f"r{i}",
            PROMPT,
            now,
            SamplingParams(max_tokens=2 * RL),
            SLO(jct_deadline_s=now + 60.0 + rng.random()),
            eos_token_id=0,
            predicted_rl=rl,
            predicted_rl_upper=rl,
        )
        true_len[r.request_id] = 10**9  # never finishes during the measurement
        core.add(r, now)

    now = 0.0
    for i in range(running):
        add(i, now)
    # Prefill everything so the batch is all decodes, then queue the rest.
    while any(r.pending > 1 for r in core.requests.values()) or core.num_waiting:
        plan = core.schedule("w0", now).plan
        now += 0.01
        core.update(StepResult(plan.step_id, "w0", [1] * len(plan.sampled_ids())), now)
    for i in range(running, running + queued):
        add(i, now)
    return core, now


def measure(policy: str, running: int, queued: int, iters: int) -> dict:
    core, now = build(policy, running, queued)
    sched, apply_ = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        plan = core.schedule("w0", now).plan
        t1 = time.perf_counter()
        result = StepResult(plan.step_id, "w0", [1] * len(plan.sampled_ids()))
        now += 0.03
        t2 = time.perf_counter()
        core.update(result, now)
        t3 = time.perf_counter()
        sched.append((t1 - t0) * 1e6)
        apply_.append((t3 - t2) * 1e6)
    assert len(plan.decodes) == running, "the measured batch must hold every running request"
    return {
        "running": running,
        "queued": core.num_waiting,
        "schedule_us_p50": float(np.percentile(sched, 50)),
        "schedule_us_p99": float(np.percentile(sched, 99)),
        "apply_us_p50": float(np.percentile(apply_, 50)),
        "apply_us_p99": float(np.percentile(apply_, 99)),
        "total_us_p99": float(np.percentile(np.add(sched, apply_), 99)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--running", type=int, default=1000)
    ap.add_argument("--queued", type=int, nargs="+", default=[0, 1000, 10000, 100000])
    ap.add_argument("--policies", default="ecoserve,vllm")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--out", default="results/sched-scale")
    a = ap.parse_args()
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}",
        "runs": {},
    }
    for policy in a.policies.split(","):
        for q in a.queued:
            m = measure(policy, a.running, q, a.iters)
            results["runs"].setdefault(policy, {})[str(q)] = m
            print(
                f"{policy:9s} running={a.running} queued={m['queued']:6d} "
                f"schedule p50/p99 {m['schedule_us_p50']:.0f}/{m['schedule_us_p99']:.0f} us  "
                f"apply p99 {m['apply_us_p99']:.0f} us",
                flush=True,
            )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
