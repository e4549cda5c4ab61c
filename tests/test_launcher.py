"""`ecoserve up` as a user runs it: every process starts, a request is served end to end
(predictor -> scheduler -> workers), and SIGINT stops them all with exit code 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import free_port, start_up  # noqa: E402

from ecoserve_common.pb import scheduler_pb2 as pb  # noqa: E402
from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc  # noqa: E402
from ecoserve_scheduler.store import RequestStore, make_engine  # noqa: E402
from ecoserve_stack.launcher import worker_threads  # noqa: E402


def test_up_serves_a_request_and_stops_cleanly(tmp_path):
    port, http_port = free_port(), free_port()
    args = ["--workers", "2", "--model", "tiny", "--grpc-port", str(port), "--home", str(tmp_path)]
    proc, lines = start_up([*args, "--num-blocks", "128", "--http-port", str(http_port)], 240)
    try:
        assert "2 worker(s)" in lines[0] and "predictor 127.0.0.1:" in lines[0]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            r = stub.Complete(
                pb.GenerateRequest(
                    prompt="Hello there", max_tokens=6, ignore_eos=True, request_id="u1"
                ),
                timeout=60,
            )
        assert r.finish_reason == "length" and len(r.token_ids) == 6
        import httpx

        body = {"prompt": "Hi", "max_tokens": 4, "ignore_eos": True}
        http = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=60)
        assert http.status_code == 200 and http.json()["usage"]["completion_tokens"] == 4
        # The engine core (its own process) reports its steps; the store writer its counters.
        stats = httpx.get(f"http://127.0.0.1:{http_port}/stats", timeout=10).json()
        assert stats["engine"]["steps"] > 0 and stats["store"]["failed"] == 0
        page = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
        assert 'ecoserve_store_writes{result="written"}' in page
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    row = RequestStore(make_engine(f"sqlite:///{tmp_path / 'ecoserve.db'}")).get("u1")
    assert (
        row.status == "finished" and row.predicted_tokens is not None and row.predicted_tokens > 0
    )
    # Workers and scheduler name the model directory on their command lines: none is left.
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "tiny-model")], capture_output=True)
    assert left.returncode == 1, left.stdout


def test_scheduler_restart_leaves_no_request_in_limbo(tmp_path):
    """kill -9 of the scheduler with accepted requests in flight, then a restart on the same
    store: every accepted request ends failed with a reason (none stays queued or running)."""
    from ecoserve_common.curve import init_keys
    from ecoserve_worker.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny-model")
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    port = free_port()

    def serve() -> subprocess.Popen:
        cmd = [sys.executable, "-m", "ecoserve_scheduler.cli", "serve", "--model", str(model)]
        cmd += ["--grpc-address", f"127.0.0.1:{port}", "--http-address", ""]
        cmd += ["--worker-bind", f"tcp://127.0.0.1:{free_port()}", "--db-url", db_url]
        cmd += ["--queue-without-workers", "true"]  # no worker: accepted requests stay queued
        cmd += ["--worker-keys-dir", str(init_keys(tmp_path / "keys"))]  # secure by default
        return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)

    first = serve()
    store = RequestStore(make_engine(db_url))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            stub = pb_grpc.SchedulerStub(channel)
            calls = [
                stub.Complete.future(
                    pb.GenerateRequest(prompt=f"hello {i}", max_tokens=4, request_id=f"k{i}"),
                    timeout=120,
                )
                for i in range(5)
            ]  # no worker: they stay queued
            wait = threading.Event()
            for _ in range(600):
                rows = [store.get(f"k{i}") for i in range(5)]
                if all(r is not None for r in rows):
                    break
                wait.wait(0.1)
            assert {r.status for r in rows} == {"queued"}
            first.kill()  # SIGKILL: no chance to clean up
            first.wait()
            for c in calls:
                with pytest.raises(grpc.RpcError) as e:
                    c.result()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        second = serve()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=120)
            rows = [store.get(f"k{i}") for i in range(5)]
            assert {(r.status, r.fail_reason) for r in rows} == {
                ("failed", "scheduler restarted before it finished")
            }
        finally:
            second.terminate()
            assert second.wait(30) == 0
    finally:
        first.kill()


def test_demo_without_data_uses_synthetic_prompts_and_says_so(tmp_path):
    out = tmp_path / "demo.json"
    cmd = [sys.executable, "-m", "ecoserve_stack.cli", "demo", "--n", "6", "--rate", "20"]
    cmd += ["--workers", "1", "--home", str(tmp_path), "--data-dir", str(tmp_path / "none")]
    cmd += ["--max-output", "8", "--json", str(out), "--model", "tiny", "--questions", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].startswith("workload: synthetic prompts")
    import json

    summary = json.loads(out.read_text())
    assert (summary["requests"], summary["completed"], summary["failed"]) == (6, 6, 0)
    assert summary["throughput_tok_s"] > 0 and summary["ttft_p50_s"] <= summary["jct_p50_s"]
    # after the table: which model, and its answer to one question (gibberish on tiny)
    assert summary["model"] == "tiny-model" and len(summary["answers"]) == 1
    assert "model tiny-model" in proc.stdout and "Q: What is the capital of France?" in proc.stdout


def test_a_model_that_is_not_here_stops_up_and_the_scheduler_with_the_reason(tmp_path):
    up = [sys.executable, "-m", "ecoserve_stack.cli", "up", "--home", str(tmp_path)]
    proc = subprocess.run(up + ["--model", "no-such-model"], capture_output=True, text=True)
    assert proc.returncode == 1 and "no-such-model" in proc.stderr
    serve = [sys.executable, "-m", "ecoserve_scheduler.cli", "serve", "--http-address", ""]
    env = dict(os.environ, ECOSERVE_MODELS_DIR=str(tmp_path / "empty"))
    proc = subprocess.run(
        serve + ["--db-url", f"sqlite:///{tmp_path / 's.db'}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        "smollm2-135m-instruct is not converted yet" in proc.stderr and "make model" in proc.stderr
    )


def test_worker_threads_split_cores_and_leave_one_for_the_control_plane():
    assert worker_threads(1, cores=2) == 1
    assert worker_threads(2, cores=16) == 7
    assert worker_threads(4, cores=2) == 1  # never zero
    assert worker_threads(1, cores=1) == 1


def _children_named(pid: int, name: bytes) -> list[int]:
    from pathlib import Path

    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                if name in Path(f"/proc/{child}/cmdline").read_bytes():
                    out.append(int(child))
            except OSError:
                pass
    return out


def test_up_with_an_api_key_restarts_a_killed_worker_and_keeps_serving(tmp_path):
    """ECOSERVE_API_KEY set: `up` still becomes ready (its readiness check sends the key); a
    worker killed with SIGKILL is started again and registers, and requests keep being served
    (the key is required: without it, UNAUTHENTICATED)."""
    import httpx

    port, http_port = free_port(), free_port()
    os.environ["ECOSERVE_API_KEY"] = "sesame-" + "k" * 24
    try:
        args = ["--workers", "2", "--model", "tiny", "--grpc-port", str(port), "--no-predictor"]
        args += ["--home", str(tmp_path), "--num-blocks", "64", "--http-port", str(http_port)]
        proc, _ = start_up([*args, "--token-budget", "64"], 240)
    finally:
        key = os.environ.pop("ECOSERVE_API_KEY")
    auth = {"Authorization": f"Bearer {key}"}
    base = f"http://127.0.0.1:{http_port}"
    body = {"prompt": "Hi", "max_tokens": 3, "ignore_eos": True}
    try:
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 401
        first = sorted(_children_named(proc.pid, b"ecoserve_worker"))
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)
        wait = threading.Event()
        for _ in range(1200):  # the launcher restarts it; it registers again
            now = sorted(_children_named(proc.pid, b"ecoserve_worker"))
            health = httpx.get(f"{base}/health", timeout=10).json()
            if first[0] not in now and len(now) == 2 and len(health["workers"]) == 2:
                break
            wait.wait(0.1)
        assert first[0] not in now and len(now) == 2 and len(health["workers"]) == 2
        r = httpx.post(f"{base}/v1/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_ctrl_c_during_start_up_stops_everything(tmp_path):
    """SIGINT before `ready` (here: the model is still being built or workers are loading)
    stops the launcher and every process it started."""
    cmd = [sys.executable, "-m", "ecoserve_stack.cli", "up", "--model", "tiny", "--workers", "1"]
    cmd += ["--home", str(tmp_path), "--grpc-port", str(free_port()), "--no-predictor"]
    cmd += ["--http-port", str(free_port())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait = threading.Event()
    for _ in range(600):  # until it has started the scheduler (so there is something to stop)
        if _children_named(proc.pid, b"ecoserve_scheduler") or proc.poll() is not None:
            break
        wait.wait(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True)
    assert left.returncode == 1, left.stdout
