"""`ecoserve up` as a user runs it: every process starts, a request is served end to end
(predictor -> scheduler -> workers), and SIGINT stops them all with exit code 0."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from ecoserve_scheduler.live import scheduler_pb2 as pb  # noqa: E402
from ecoserve_scheduler.live import scheduler_pb2_grpc as pb_grpc  # noqa: E402
from ecoserve_scheduler.store import RequestStore, make_engine  # noqa: E402


def test_up_serves_a_request_and_stops_cleanly(tmp_path):
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    port, http_port = ports
    cmd = [sys.executable, "-m", "ecoserve_scheduler.cli", "up", "--workers", "2"]
    cmd += ["--grpc-port", str(port), "--home", str(tmp_path), "--num-blocks", "128"]
    cmd += ["--http-port", str(http_port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(240), f"not ready: {lines}"
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
