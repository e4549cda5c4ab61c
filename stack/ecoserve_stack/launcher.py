"""`ecoserve up`: predictor, scheduler and N workers as local processes (SQLite).

`--model` is a registered name (default smollm2-135m-instruct, a real instruction-tuned model),
a .gguf file or a Hugging Face checkpoint directory (ecoserve_common.models); a name or .gguf
not converted yet is fetched and converted first by `python -m ecoserve_worker.models fetch`,
run as a subprocess so this process stays light. `--model tiny` builds the tiny random-weight
test model once under --home instead. The scheduler gets the spec (its served name is what
/v1/models lists), every worker the resolved directory, `--device` and, when given, `--dtype`
(the worker's default: bfloat16 on a CPU with native bf16 and on cuda, else float32) and
`--quantization` (int8/int4 weight-only copies for decode steps of a few rows; CPU only).

The worker plane is CURVE-secured: the keys are made once under `--home`/keys (0700, secret
files 0600; `ecoserve_common.curve.init_keys`) and kept; the scheduler and every worker get that
directory and a fresh shared secret for this launch through the environment
(ECOSERVE_WORKER_KEYS_DIR, ECOSERVE_WORKER_AUTH_TOKEN), never on a command line.

It prints where to connect when every worker has registered, then waits. A process that exits
is started again with backoff (supervise.Supervisor): a restarted worker registers again, a
restarted scheduler fails the rows its predecessor left unfinished. Ctrl-C (or SIGTERM), during
start-up too, stops the workers, then the scheduler, then the predictor, each with SIGTERM and a
grace period (with --drain-timeout-s a worker's SIGTERM first drains it through the scheduler).
With ECOSERVE_API_KEY (or --api-key-file) every client call needs that key; the launcher's own
readiness check sends it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ecoserve_common.curve import init_keys
from ecoserve_common.models import DEFAULT_MODEL, REGISTRY, ModelMissing, resolve, served_name

from .supervise import Supervisor, stop_procs

log = logging.getLogger("ecoserve.up")

GRACE_S = 10.0
READY_TIMEOUT_S = 180.0
TINY = "tiny"  # --model tiny: the random-weight test model, built under --home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecoserve up", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME|GGUF|DIR",
        help=f"registered name (default {DEFAULT_MODEL}), .gguf file, checkpoint directory, "
        f"or `{TINY}` (random weights, for tests)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="workers' device")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="workers' dtype (default: the worker's choice, bfloat16 where the CPU has native bf16 "
        "or on cuda, float32 otherwise)",
    )
    p.add_argument(
        "--quantization",
        choices=("none", "int8", "int4"),
        default="none",
        help="workers' weight-only quantization of the projections, used for decode steps of "
        "a few rows (single-stream speed); CPU only (default: none)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--token-budget",
        type=int,
        default=0,
        help="tokens per step every worker announces, without profiling at start-up (a few "
        "seconds, once per machine: the profile is kept); default: each worker profiles",
    )
    p.add_argument("--policy", default="ecoserve")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible API")
    p.add_argument("--num-blocks", type=int, default=512, help="KV blocks per worker")
    p.add_argument("--home", default=".ecoserve", help="tiny model and SQLite file go here")
    p.add_argument("--db-url", default=None, help="default: sqlite:///HOME/ecoserve.db")
    p.add_argument("--no-predictor", action="store_true", help="default lengths instead")
    p.add_argument(
        "--api-key-file",
        default=None,
        help="a file holding the bearer key clients must send on gRPC and /v1 HTTP (or set "
        "ECOSERVE_API_KEY); never on a command line, where `ps` shows it",
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=0.0,
        help="workers leave gracefully on SIGTERM: the scheduler drains them (what runs there "
        "finishes there) for at most this long (default 0: SIGTERM stops them at once)",
    )
    p.add_argument(
        "--worker-threads",
        type=int,
        default=0,
        help="torch threads per worker (default: (cores - 1) / --workers, at least 1)",
    )
    return p


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _wait_ready(
    address: str,
    workers: int,
    procs: dict[str, subprocess.Popen],
    api_key: str = "",
    stopping: threading.Event | None = None,
) -> None:
    """Until `workers` workers have registered (asked with the API key, when one is set);
    RuntimeError when a process exits, `stopping` is set (Ctrl-C) or the time is up."""
    import grpc

    from ecoserve_common.pb import scheduler_pb2 as pb
    from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc

    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    deadline = time.monotonic() + READY_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        while time.monotonic() < deadline:
            if stopping is not None and stopping.is_set():
                raise RuntimeError("interrupted during start-up")
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited during start-up")
            try:
                stats = stub.Stats(pb.StatsRequest(), timeout=2, metadata=metadata)
                if len(json.loads(stats.json).get("workers", [])) >= workers:
                    return
            except grpc.RpcError:
                pass
            threading.Event().wait(0.2)
    raise RuntimeError(f"not ready after {READY_TIMEOUT_S:.0f}s")


def stop_all(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM in reverse start order (workers first), then SIGKILL what outlives the grace."""
    stop_procs(procs, GRACE_S)


def worker_threads(workers: int, cores: int | None = None) -> int:
    """Each local worker's share of the cores, one core left for the scheduler, predictor
    and HTTP. torch gives every process one thread per core, and an OpenMP step waits for
    its slowest thread: measured on 2 cores (bench/peer_vllm.py), one worker with 2 threads
    next to the scheduler made 407 output tok/s, with 1 thread 565; two workers with 2 threads
    each ran decode steps 3-5x slower than alone."""
    return max(1, ((cores or os.cpu_count() or 1) - 1) // max(1, workers))


@dataclass
class Stack:
    supervisor: Supervisor
    grpc_address: str
    http_address: str
    model: str  # the spec the scheduler serves
    model_dir: str  # what the workers load
    db_url: str
    predictor: str

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        """Each service's current process, in start order."""
        return self.supervisor.procs

    def describe(self, workers: int, policy: str) -> str:
        return (
            f"EcoServe up: gRPC {self.grpc_address} (ecoserve.scheduler.v1.Scheduler), "
            f"OpenAI-compatible http://{self.http_address}/v1, {workers} worker(s) on "
            f"{served_name(self.model)} ({self.model_dir}), policy {policy}, store {self.db_url}"
            + (f", predictor {self.predictor}" if self.predictor else ", no predictor")
        )


def prepare_model(spec: str, home: Path) -> tuple[str, str]:
    """(the spec the scheduler serves, the directory the workers load): `tiny` is built under
    `home`; a name or .gguf not converted yet is fetched first (a subprocess: the converter
    needs torch + transformers). RuntimeError when it cannot be had."""
    if spec == TINY:
        model = home / "tiny-model"
        if not (model / "config.json").is_file():
            from ecoserve_worker.tiny_model import build_tiny_model

            build_tiny_model(model)
        return str(model), str(model)
    try:
        return spec, str(resolve(spec))
    except ModelMissing as missing:
        if spec not in REGISTRY and not spec.endswith(".gguf"):
            raise RuntimeError(str(missing)) from None  # a broken dir, an unknown name
    log.info("model %s is not converted yet: fetching it (once)", spec)
    fetch = subprocess.run(_python("ecoserve_worker.models", "fetch", spec))
    if fetch.returncode != 0:
        raise RuntimeError(f"could not fetch {spec} (exit {fetch.returncode}); see above")
    try:
        return spec, str(resolve(spec))
    except ModelMissing as exc:
        raise RuntimeError(str(exc)) from None


def start_stack(a: argparse.Namespace, stopping: threading.Event | None = None) -> Stack:
    """Start every process of `a` (build_parser's options) under one Supervisor and wait until
    all workers have registered; on failure (or `stopping` set: Ctrl-C) everything started is
    stopped and RuntimeError raised."""
    home = Path(a.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    model, model_dir = prepare_model(a.model, home)
    token = secrets.token_hex(16)  # workers of this launch only
    worker_addr = f"tcp://127.0.0.1:{free_port()}"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        ECOSERVE_WORKER_AUTH_TOKEN=token,
        ECOSERVE_WORKER_KEYS_DIR=str(init_keys(home / "keys")),
    )
    api_key = os.environ.get("ECOSERVE_API_KEY", "")
    if getattr(a, "api_key_file", None):
        api_key = Path(a.api_key_file).read_text().strip()
    if api_key:
        env["ECOSERVE_API_KEY"] = api_key  # the environment, never a command line
    sup = Supervisor()
    stack = Stack(
        sup,
        f"127.0.0.1:{a.grpc_port}",
        f"127.0.0.1:{a.http_port}",
        model,
        model_dir,
        a.db_url or f"sqlite:///{home / 'ecoserve.db'}",
        "" if a.no_predictor else f"127.0.0.1:{free_port()}",
    )
    try:
        if stack.predictor:
            sup.start(
                "predictor",
                _python("ecoserve_predictor", "serve", "--address", stack.predictor),
                env,
            )
        sup.start(
            "scheduler",
            _python(
                "ecoserve_scheduler.live.serve",
                *("--model", model, "--policy", a.policy, "--grpc-address", stack.grpc_address),
                *("--worker-bind", worker_addr, "--db-url", stack.db_url),
                *("--predictor", stack.predictor, "--http-address", stack.http_address),
            ),
            env,
        )
        threads = a.worker_threads or worker_threads(a.workers)
        for i in range(a.workers):
            cmd = worker_command(a, f"w{i}", worker_addr, model_dir, threads)
            sup.start(f"worker-{i}", cmd, env)
        _wait_ready(stack.grpc_address, a.workers, stack.procs, api_key, stopping)
    except BaseException:
        sup.stop_all(GRACE_S)
        raise
    return stack


def worker_command(
    a: argparse.Namespace, worker_id: str, worker_addr: str, model_dir: str, threads: int
) -> list[str]:
    """One worker's command line: the options `up` passes through."""
    quant = getattr(a, "quantization", "none")  # a Namespace built elsewhere may lack them
    drain = getattr(a, "drain_timeout_s", 0.0)
    return _python(
        "ecoserve_worker",
        *("--scheduler", worker_addr, "--worker-id", worker_id, "--model", model_dir),
        *("--num-blocks", str(a.num_blocks)),
        *("--threads", str(threads), "--device", a.device),
        *(("--dtype", a.dtype) if a.dtype else ()),
        *(("--quantization", quant) if quant != "none" else ()),
        *(("--token-budget", str(a.token_budget), "--no-profile") if a.token_budget else ()),
        *(("--drain-timeout-s", str(drain)) if drain else ()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.quantization != "none" and a.device != "cpu":  # every worker would refuse it
        parser.error(f"--quantization {a.quantization}: CPU only (workers on {a.device})")
    if a.quantization != "none" and a.dtype not in (None, "bfloat16"):
        parser.error(f"--quantization {a.quantization}: needs bfloat16 (--dtype {a.dtype})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack = start_stack(a, stopping)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 130 if stopping.is_set() else 1
    try:
        print(stack.describe(a.workers, a.policy), flush=True)
        print("ready (Ctrl-C stops everything)", flush=True)
        while not stopping.is_set():
            stack.supervisor.poll()  # a process that exited is started again, with backoff
            stopping.wait(0.5)
        return 0
    finally:
        stack.supervisor.stop_all(GRACE_S)
