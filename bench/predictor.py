"""Predictor benchmark: accuracy on the honest test split and latency through the gRPC service.

    python bench/predictor.py --out results/predictor [--artifact DIR] [--data-dir DIR]
        [--candidate NAME=DIR ...] [--keep-latency]

* Accuracy (needs ../shared/data; skipped with a reason when absent): the ShareGPT test split
  of `data.honest_split` (10% of conversations by hash, never trained on, less every pair whose
  normalised prompt the training or validation side holds) written to a JSONL file and run
  through `ecoserve-predictor evaluate` (ONNX Runtime, as served): spearman, mae,
  within_1_bucket, coverage_upper with bootstrap 95% intervals, overall (`model`) and for the
  first_turn / later_turns / unseen_prompt / seen_prompt slices (`evaluate`); each row's
  history is the earlier turns of its record in the file, which an artifact with a fit
  `history_blend` reads (history.py; `evaluate.history.blend` says so). The same on the
  old conversation-only validation split (`conversation_split_validation`), which mixes in
  prompts seen in training, for comparison with the figure it gave. Two baselines on the test
  split (global median; regression of log length on log prompt tokens).
* Latency: `ecoserve-predictor serve` started as a process on 127.0.0.1 (CPU provider); one
  client sends batch-1 calls (p50/p99 ms) and batch-32 calls (p50 ms per batch), one at a time;
  then 4 client threads send batch-32 calls for `--load-s` seconds: prompts/s.
  `--keep-latency` copies it from the existing summary instead (a busy machine times wrong).
* Each `--candidate NAME=DIR` artifact: its test-split metrics, ONNX Runtime latency in
  process at batch 1 and 32, and its size on disk, for the model choice.

Writes OUT/summary.json. Fields of the existing summary this run did not measure (`latency`
with --keep-latency, `candidates` without --candidate) are kept, listed in `carried_over`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for sub in ("services/predictor", "services/scheduler"):
    sys.path.insert(0, str(REPO / sub))

import numpy as np  # noqa: E402

from ecoserve_predictor.data import (  # noqa: E402
    DEFAULT_DATA_DIR,
    Pair,
    honest_split,
    load_sharegpt,
    split,
    synthetic_pairs,
)
from ecoserve_predictor.metrics import baselines, evaluate  # noqa: E402
from ecoserve_predictor.runtime import PACKAGED_ARTIFACT, OnnxPredictor  # noqa: E402
from ecoserve_stack.launcher import free_port  # noqa: E402


def accuracy(predictor: OnnxPredictor, val) -> dict[str, float]:
    point, upper = [], []
    for s in range(0, len(val), 256):
        r = predictor.predict([p.prompt for p in val[s : s + 256]])
        point.extend(r.point)
        upper.extend(r.upper)
    return evaluate(point, upper, [p.response_tokens for p in val], predictor.edges)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [
            str(REPO / "services/predictor"),
            str(REPO / "services/scheduler"),
            env.get("PYTHONPATH", ""),
        ]
    )
    return env


def run_evaluate(artifact: Path, pairs: list[Pair], workdir: Path, name: str) -> dict[str, Any]:
    """`ecoserve-predictor evaluate` (the command, as a user runs it) on these pairs, written
    in the shared ShareGPT format."""
    data, out = workdir / f"{name}.jsonl.gz", workdir / f"{name}.json"
    with gzip.open(data, "wt", encoding="utf-8") as f:
        for p in pairs:
            row = {"id": p.record, "turn": p.turn, "prompt": p.prompt}
            row |= {"response_tokens": p.response_tokens, "prompt_tokens": p.prompt_tokens}
            f.write(json.dumps(row) + "\n")
    cmd = [sys.executable, "-m", "ecoserve_predictor", "--log-level", "WARNING", "evaluate"]
    cmd += ["--data", str(data), "--artifact", str(artifact), "--out", str(out)]
    subprocess.run([*cmd, "--device", "cpu"], env=_env(), check=True)
    return json.loads(out.read_text()) | {"data": f"{name} split (a temporary file)"}


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def in_process_latency(predictor: OnnxPredictor, prompts: list[str]) -> dict[str, float]:
    def timed(batch: int, n: int) -> list[float]:
        out = []
        for i in range(n):
            chunk = [prompts[(i * batch + j) % len(prompts)] for j in range(batch)]
            t0 = time.perf_counter()
            predictor.predict(chunk)
            out.append(time.perf_counter() - t0)
        return out[5:]

    b1, b32 = timed(1, 205), timed(32, 55)
    return {"p50_ms_b1": _pct(b1, 50), "p99_ms_b1": _pct(b1, 99), "p50_ms_b32": _pct(b32, 50)}


def grpc_latency(artifact: Path, prompts: list[str], load_s: float) -> dict[str, float]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ecoserve_common.pb import predictor_pb2 as pb
    from ecoserve_common.pb import predictor_pb2_grpc as pb_grpc

    port = free_port()
    env = _env()
    cmd = [sys.executable, "-m", "ecoserve_predictor", "--log-level", "WARNING", "serve"]
    cmd += ["--artifact", str(artifact), "--address", f"127.0.0.1:{port}", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        stub = pb_grpc.PredictorStub(channel)

        def call(batch: int, i: int) -> float:
            chunk = [prompts[(i * batch + j) % len(prompts)] for j in range(batch)]
            t0 = time.perf_counter()
            r = stub.Predict(pb.PredictRequest(prompts=chunk), timeout=10)
            dt = time.perf_counter() - t0
            assert len(r.predictions) == batch
            return dt

        b1 = [call(1, i) for i in range(320)][20:]
        b32 = [call(32, i) for i in range(110)][10:]
        done = [0]
        lock = threading.Lock()
        stop_at = time.perf_counter() + load_s

        def client(k: int) -> None:
            i = k * 1000
            while time.perf_counter() < stop_at:
                call(32, i)
                i += 1
                with lock:
                    done[0] += 32

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        return {
            "p50_ms_b1": _pct(b1, 50),
            "p99_ms_b1": _pct(b1, 99),
            "p50_ms_b32": _pct(b32, 50),
            "p99_ms_b32": _pct(b32, 99),
            "prompts_per_s": done[0] / elapsed,
            "clients": 4,
            "load_s": round(elapsed, 1),
        }
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=10)


def _size_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6, 2)


def measure_accuracy(summary: dict[str, Any], artifact: Path, data_dir: str) -> list[Pair]:
    """Fills summary's accuracy fields from `evaluate`; returns the test pairs ([] without
    the data: accuracy is then skipped, and the summary's `workload` says why)."""
    try:
        pairs = load_sharegpt(data_dir)
    except FileNotFoundError as exc:
        summary["workload"] = f"synthetic prompts (accuracy skipped: {exc})"
        return []
    train, val, test = honest_split(pairs)
    summary["workload"] = "sharegpt honest test split (data.honest_split)"
    summary["split"] = {"train": len(train), "validation": len(val), "test": len(test)}
    with tempfile.TemporaryDirectory() as d:
        result = run_evaluate(artifact, test, Path(d), "test")
        summary["conversation_split_validation"] = run_evaluate(
            artifact, split(pairs)[1], Path(d), "conversation_split_validation"
        )
    summary["evaluate"] = result
    keys = ("spearman", "mae", "within_1_bucket", "coverage_upper", "n")
    summary["model"] = {k: result[k] for k in keys}
    summary["baselines"] = baselines(
        np.array([p.prompt_tokens for p in train]),
        np.array([p.response_tokens for p in train]),
        np.array([p.prompt_tokens for p in test]),
        np.array([p.response_tokens for p in test]),
        tuple(summary["artifact"]["bucket_edges"]),
    )
    return test


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/predictor")
    ap.add_argument("--artifact", default=str(PACKAGED_ARTIFACT))
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--load-s", type=float, default=10.0)
    ap.add_argument("--candidate", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument(
        "--keep-latency", action="store_true", help="copy latency from OUT/summary.json"
    )
    a = ap.parse_args(argv)
    artifact, out = Path(a.artifact), Path(a.out)
    previous_path = out / "summary.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    predictor = OnnxPredictor(artifact, device="cpu")
    summary: dict[str, Any] = {"artifact": predictor.meta, "artifact_mb": _size_mb(artifact)}
    test = measure_accuracy(summary, artifact, a.data_dir)
    print(f"workload: {summary['workload']}")
    if test:
        for name in ("first_turn", "later_turns", "unseen_prompt"):
            print(
                name, json.dumps({k: summary["evaluate"][name].get(k) for k in ("n", "spearman")})
            )
        print("model", json.dumps(summary["model"]))
    prompts = [p.prompt for p in test] or [p.prompt for p in synthetic_pairs(500)]
    if not a.keep_latency:
        summary["latency"] = grpc_latency(artifact, prompts, a.load_s)
        print("latency", json.dumps(summary["latency"]))
    cands = {}
    for spec in a.candidate:
        name, path = spec.split("=", 1)
        cand = OnnxPredictor(path, device="cpu")
        cands[name] = {
            "kind": cand.meta["kind"],
            "params": cand.meta["params"],
            "train_s": cand.meta["train_s"],
            "epochs": cand.meta["epochs"],
            "size_mb": _size_mb(Path(path)),
            "test": accuracy(cand, test) if test else None,
            "onnx_in_process": in_process_latency(cand, prompts),
        }
        print(name, json.dumps(cands[name]))
    if cands:
        summary["candidates"] = cands
    summary["machine"] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    kept = [k for k in ("latency", "candidates") if k not in summary and k in previous]
    summary |= {k: previous[k] for k in kept}
    if kept:
        summary["carried_over"] = kept  # from an earlier run, not measured by this one
    out.mkdir(parents=True, exist_ok=True)
    previous_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
