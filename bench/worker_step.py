"""Time one worker step the way the serving loop runs it: a BatchPlan protobuf in, a StepResult
frame out (`WorkerServer._on_plan` with the socket stubbed), on the tiny model.

    python bench/worker_step.py [--batch 32] [--steps 300] [--prefill 0] [--threads 1]

It is what a scheduler's plan costs inside the worker: plan decoding, step inputs, the forward
pass, sampling and the result's encoding. Prints the median and p10 step time in microseconds
as one JSON line. It uses only names every version of the worker has had, so the same file can
time an older checkout (PYTHONPATH=OLD/services/worker:OLD/services/common) against this one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import ecoserve_worker  # noqa: F401
except ImportError:  # not installed: use the source tree
    for sub in ("services/common", "services/worker"):
        sys.path.insert(0, str(REPO / sub))

import torch  # noqa: E402

import ecoserve_worker  # noqa: E402
from ecoserve_common.pb import worker_pb2 as pb  # noqa: E402
from ecoserve_worker.backends import ModelBackend  # noqa: E402
from ecoserve_worker.model_runner import ModelRunner  # noqa: E402
from ecoserve_worker.server import WorkerServer  # noqa: E402

BLOCK = 16


class _NullSocket:
    def send(self, frame: bytes, flags: int = 0) -> None:
        self.last = frame


def make_plan(batch: int, prefill: int, vocab: int, seed: int = 0) -> pb.BatchPlan:
    """`batch` decode rows at unequal contexts (32..287 tokens) and, when `prefill` > 0, one
    prompt chunk of that many tokens; disjoint block tables, greedy sampling."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(32, 288, (batch,), generator=g).tolist()
    lens = [c // BLOCK + 1 for c in ctx]
    nxt = 0
    blocks: list[int] = []
    for n in lens:
        blocks += range(nxt, nxt + n)
        nxt += n
    decodes = pb.DecodeBatch(
        request_ids=[f"r{i}" for i in range(batch)],
        positions=ctx,
        token_ids=torch.randint(4, vocab, (batch,), generator=g).tolist(),
        table_lens=lens,
        block_ids=blocks,
        sampling_sets=[pb.SamplingParams(top_p=1.0)],
        sampling_index=[0] * batch,
    )
    prefills = []
    if prefill:
        n = -(-prefill // BLOCK)
        prefills.append(
            pb.PrefillChunk(
                request_id="p0",
                start_pos=0,
                token_ids=torch.randint(4, vocab, (prefill,), generator=g).tolist(),
                block_table=pb.BlockTable(blocks=range(nxt, nxt + n)),
                sample=True,
                sampling=pb.SamplingParams(top_p=1.0),
            )
        )
        nxt += n
    return pb.BatchPlan(step_id=1, decodes=decodes, prefills=prefills), nxt


def time_steps(server: WorkerServer, msg: pb.BatchPlan, steps: int) -> list[float]:
    for _ in range(10):  # warm-up
        server._on_plan(msg)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        server._on_plan(msg)
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF model dir (default: build the tiny model)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=0, help="tokens of one prompt chunk too")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="ecoserve-tiny-") as tmp:
        model_dir = a.model
        if model_dir is None:
            from ecoserve_worker.tiny_model import build_tiny_model

            model_dir = Path(tmp) / "tiny"
            build_tiny_model(model_dir)
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        msg, blocks = make_plan(a.batch, a.prefill, vocab)
        runner = ModelRunner(model_dir, "cpu", torch.float32, blocks + 1, BLOCK)
        server = WorkerServer("tcp://127.0.0.1:1", "w0", ModelBackend(runner))
        server._sock = _NullSocket()
        if hasattr(server, "_sock_lock"):  # the serving loop holds it while it reads plans
            server._sock_lock.acquire()
        samples = time_steps(server, msg, a.steps)
    samples.sort()
    print(
        json.dumps(
            {
                "worker": str(Path(ecoserve_worker.__file__).parent),
                "batch": a.batch,
                "prefill": a.prefill,
                "threads": a.threads,
                "median_us": round(statistics.median(samples) * 1e6, 1),
                "p10_us": round(samples[len(samples) // 10] * 1e6, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
