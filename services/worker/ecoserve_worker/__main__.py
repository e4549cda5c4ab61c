"""Command line: run a worker against a scheduler, or build the tiny test model.

    python -m ecoserve_worker --scheduler tcp://127.0.0.1:5555 --worker-id w0   # SmolLM2
    python -m ecoserve_worker --scheduler tcp://127.0.0.1:5555 --worker-id w0 --model DIR
    python -m ecoserve_worker --scheduler tcp://127.0.0.1:5555 --worker-id w0 \\
        --model smollm2-135m-instruct --device cuda --dtype bfloat16
    python -m ecoserve_worker --scheduler tcp://127.0.0.1:5555 --worker-id w1 \\
        --sim llama-2-7b/a100-80gb --num-blocks 2048
    python -m ecoserve_worker --scheduler tcp://127.0.0.1:5555 --worker-id e0 --echo
    python -m ecoserve_worker build-tiny-model DIR   # same as python -m ecoserve_worker.tiny_model

--model is a registered name (default: smollm2-135m-instruct), a .gguf file or a Hugging Face
checkpoint directory; a name or .gguf is fetched and converted into the models directory the
first time (`ecoserve_worker.models.ensure_model`; `make model` does it ahead of time).

Worker-plane keys and secrets never come from the command line (any user sees it in `ps`):
the CURVE keys from `--keys-dir` / ECOSERVE_WORKER_KEYS_DIR (the scheduler's server.key and this
worker's worker.key_secret), the shared secret from ECOSERVE_WORKER_AUTH_TOKEN or
`--auth-token-file`. Without keys the worker refuses to start unless `--insecure` (or
ECOSERVE_WORKER_PLANE_INSECURE=true) says the network is trusted.

A model worker profiles itself before it registers: it times steps over a grid of batch shapes,
announces the token budget where prefill throughput stops improving (unless --token-budget is
given) and, with --profile-out, writes the timings as JSONL the simulator's cost model fits
(`ecoserve fit-profile`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from ecoserve_common.models import DEFAULT_MODEL

from .dtypes import DTYPES, QUANTIZATIONS, default_dtype

log = logging.getLogger("ecoserve_worker")

KEYS_ENV = "ECOSERVE_WORKER_KEYS_DIR"
INSECURE_ENV = "ECOSERVE_WORKER_PLANE_INSECURE"
TOKEN_ENV = "ECOSERVE_WORKER_AUTH_TOKEN"

DEFAULT_TOKEN_BUDGET = 512
# A profiled budget grows while a pure prefill step stays within this. Not a per-step TPOT
# bound: TPOT is a request's average over its tokens (0.2 s SLO over ~100 tokens), so a 1 s
# prefill step costs each running request under 10 ms per token, while holding prompts back
# costs TTFT. Measured on SmolLM2 bf16, 1 thread (results/peer): with a 100 ms target the budget
# was 64 tokens and TTFT p99 went past 2 s from 5.7 req/s on. vLLM's CPU default is 2048.
DEFAULT_STEP_TARGET_MS = 1000.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ecoserve_worker",
        description="EcoServe worker: executes the scheduler's BatchPlans on a model (or the "
        "cost model) and answers with StepResults over ZeroMQ.",
        epilog="Tiny random test model: python -m ecoserve_worker build-tiny-model DIR",
    )
    p.add_argument("--scheduler", required=True, help="scheduler ROUTER address, tcp://HOST:PORT")
    p.add_argument("--worker-id", default=f"{socket.gethostname()}-worker", help="unique id")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--model",
        metavar="NAME|GGUF|DIR",
        help="registered name, .gguf file or HF Llama-family directory "
        f"(default: {DEFAULT_MODEL}, unless --sim or --echo)",
    )
    what.add_argument("--sim", metavar="PROFILE", help="no model: sleep as the cost model predicts")
    what.add_argument(
        "--echo", action="store_true", help="no model, no sleep: answer at once (wire timing)"
    )
    p.add_argument(
        "--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (ignored with --sim)"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights, activations and KV pool (default: the fastest the device has: bfloat16 "
        "on a CPU with AVX512-BF16/AMX and on CUDA, float32 on other CPUs)",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="none",
        help="weight-only int8/int4 copies of the projections, used for decode steps of a few "
        "rows (single-stream speed; bigger steps keep the dense weights); CPU only "
        "(default: none)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads on CPU (default: torch's own, one per core); give each "
        "worker sharing a host its share of the cores",
    )
    p.add_argument("--num-blocks", type=int, default=1024, help="KV cache blocks")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help=f"tokens per step to announce (default: profiled; {DEFAULT_TOKEN_BUDGET} without)",
    )
    p.add_argument("--no-profile", action="store_true", help="skip start-up profiling")
    p.add_argument(
        "--step-target-ms",
        type=float,
        default=DEFAULT_STEP_TARGET_MS,
        help="profiled budget: grow it while a pure prefill step of that many tokens takes at "
        f"most this long (default {DEFAULT_STEP_TARGET_MS:g})",
    )
    p.add_argument("--profile-out", metavar="JSONL", help="write the start-up step timings here")
    p.add_argument(
        "--no-profile-cache",
        action="store_true",
        help="profile even where this machine kept a profile of the same model and settings "
        "($ECOSERVE_PROFILE_CACHE, default ~/.cache/ecoserve/profiles)",
    )
    p.add_argument(
        "--keys-dir",
        default=os.environ.get(KEYS_ENV, ""),
        help=f"CURVE keys: server.key and worker.key_secret (env {KEYS_ENV})",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=_env_true(INSECURE_ENV),
        help=f"no keys: a plain, unauthenticated connection (env {INSECURE_ENV}=true)",
    )
    p.add_argument("--auth-token", action=_RefuseSecret, help=f"not a flag: set env {TOKEN_ENV}")
    p.add_argument(
        "--auth-token-file",
        default="",
        help=f"a file holding the shared secret (default: env {TOKEN_ENV}, else none)",
    )
    p.add_argument(
        "--heartbeat-s",
        type=float,
        default=0.5,
        help="heartbeat period, during steps too (the scheduler may ask for a shorter one)",
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=0.0,
        help="SIGTERM leaves gracefully: the scheduler drains this worker (admits nothing new "
        "here, lets what runs here finish) and it exits when that is done or after this long; "
        "0 (default): SIGTERM exits at once. SIGINT and a second SIGTERM always do",
    )
    p.add_argument(
        "--health-address",
        default="",
        metavar="HOST:PORT",
        help="serve GET /livez and /readyz here for probes (health.py); default: off, the "
        "worker listens on no port",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return p


class _RefuseSecret(argparse.Action):
    """--auth-token: refused (a command line is visible to every user in `ps`), saying where
    the secret goes instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            f"{option_string}: not on the command line; set {TOKEN_ENV} or --auth-token-file"
        )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def worker_plane(args: argparse.Namespace):
    """(WorkerKeys or None, auth token) from files and the environment; ValueError saying what
    to do when there are no keys and --insecure was not given."""
    from ecoserve_common.curve import HOW_TO_CREATE, WorkerKeys

    token = os.environ.get(TOKEN_ENV, "")
    if args.auth_token_file:
        with open(args.auth_token_file) as f:
            token = f.read().strip()
    if args.keys_dir:
        return WorkerKeys.load(os.path.expanduser(args.keys_dir)), token
    if args.insecure:
        log.warning("worker plane INSECURE (--insecure): no encryption, no scheduler identity")
        return None, token
    raise ValueError(
        f"no worker keys: give --keys-dir DIR (or {KEYS_ENV}) holding the scheduler's server.key "
        f"and a worker.key_secret ({HOW_TO_CREATE} on the scheduler's host; another host: see "
        f"services/worker/README.md), or --insecure on a trusted, isolated network"
    )


def _device(text: str) -> str:
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda or cuda:N")
    return text


def check_device(device: str) -> None:
    """ValueError, with the reason, if torch cannot run on `device` here."""
    import torch

    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: CUDA is not available to this torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'no'}); use --device cpu"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def make_backend(args: argparse.Namespace):
    budget = args.token_budget or DEFAULT_TOKEN_BUDGET
    if args.sim:
        from .backends import SimBackend

        return SimBackend(args.sim, args.num_blocks, args.block_size, budget)
    if args.echo:
        from .backends import EchoBackend

        return EchoBackend(args.num_blocks, args.block_size, budget)
    import torch

    from ecoserve_common.models import served_name

    from . import quant
    from .backends import ModelBackend
    from .model_runner import ModelRunner
    from .models import ensure_model

    quant.check(args.quantization, args.device)  # before CUDA is looked at
    check_device(args.device)
    dtype = args.dtype or default_dtype(args.device)
    quant.check(args.quantization, args.device, getattr(torch, dtype))  # before the model
    spec = args.model or DEFAULT_MODEL
    path = ensure_model(spec)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runner = ModelRunner(
        path,
        args.device,
        getattr(torch, dtype),
        args.num_blocks,
        args.block_size,
        quantization=args.quantization,
    )
    kv_bytes = sum(t.numel() * t.element_size() for t in runner.kv_cache)
    log.info(
        "model %s (%s), device %s, dtype %s, %s, %d torch threads; KV pool %d tokens = %d "
        "blocks of %d (%.1f MiB)",
        served_name(spec),
        path,
        runner.device,
        dtype,
        runner.quant.describe(),
        torch.get_num_threads(),
        runner.num_blocks * runner.block_size,
        runner.num_blocks,
        runner.block_size,
        kv_bytes / 2**20,
    )
    if not args.no_profile:
        budget = profile_at_start(
            runner,
            args.token_budget,
            args.profile_out,
            path,
            not args.no_profile_cache,
            args.step_target_ms / 1e3,
        )
    return ModelBackend(runner, token_budget=budget, model_id=served_name(spec))


def profile_at_start(
    runner,
    token_budget: int | None,
    out: str | None,
    model_dir=None,
    use_cache: bool = True,
    step_target_s: float | None = None,
) -> int:
    """Time what the budget needs (pure prefill steps, smallest first, up to the first one
    slower than the step target) or, with `out`, the whole default grid; or reuse this
    machine's earlier profile of the same model and settings (`profile_cache`). Return the
    budget to announce (given, else profiled)."""
    import time

    import torch

    from . import profile_cache
    from .profiling import budget_shapes, default_shapes, profile_runner, write_timings
    from .profiling import token_budget as knee

    t0 = time.perf_counter()
    shapes = default_shapes() if out else budget_shapes()
    stop_above_s = None if out else step_target_s
    key = None
    rows = None
    if use_cache and model_dir is not None:
        grid = [*shapes, (-1, int(1e6 * (stop_above_s or 0)), 0, 0)]  # the cut is in the key
        key = profile_cache.profile_key(runner, model_dir, torch.get_num_threads(), grid)
        rows = profile_cache.load(key)
    source = "cached profile" if rows else "profiled"
    if not rows:
        rows = profile_runner(runner, shapes, stop_above_s=stop_above_s)
        if key is not None:
            profile_cache.store(key, rows)
    budget = token_budget or knee(
        rows, fraction=0.9, step=runner.block_size, step_target_s=step_target_s
    )
    log.info(
        "%s: %d step shapes in %.1fs: token budget %d%s",
        source,
        len(rows),
        time.perf_counter() - t0,
        budget,
        "" if token_budget is None else " (given)",
    )
    if out:
        log.info("step timings written to %s", write_timings(rows, out))
    return budget


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build-tiny-model"]:
        from .tiny_model import main as tiny_main

        tiny_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from ecoserve_common.curve import KeysError

    from .server import WorkerServer

    try:
        keys, token = worker_plane(args)  # before the model loads: fail fast
        backend = make_backend(args)
    except (ValueError, KeyError, OSError, KeysError) as exc:  # say so, no trace
        log.error("cannot start worker: %s", exc)
        return 2
    server = WorkerServer(
        args.scheduler, args.worker_id, backend, token, heartbeat_s=args.heartbeat_s, keys=keys
    )
    if args.health_address:
        from .health import serve_health

        try:
            serve_health(args.health_address, server.status)
        except (OSError, ValueError) as exc:
            log.error("cannot serve probes at %s: %s", args.health_address, exc)
            return 2

    def on_signal(signum, _frame) -> None:
        if signum == signal.SIGTERM and args.drain_timeout_s > 0 and not server.leaving:
            server.leave(args.drain_timeout_s)  # a rolling update: finish what runs here first
            return
        log.info("signal %s: stopping", signal.Signals(signum).name)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
