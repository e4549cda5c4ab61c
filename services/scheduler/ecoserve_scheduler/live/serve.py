"""The scheduler process: `ecoserve-scheduler serve --model NAME|GGUF|DIR ...` (see
SchedulerSettings).

`--model` is resolved with ecoserve_common.models.resolve (never converted here: that is the
worker's `make model`); a model not on this machine stops start-up with exit code 2 and the
message saying how to get it. Its served name (ecoserve_common.models.served_name) is what
/v1/models lists and what responses carry as `model`.

Start-up order: the store (schema created; rows a previous run left queued or running are
failed with a reason, so none vanish; written from then on by one batching thread,
store_writer.StoreWriter), the tokenizer, the engine core (by default its own
process, engine_client.EngineClient; `--engine-process false` keeps it a thread of this one)
with its worker socket, then the
gRPC API and, with `http_address`, the OpenAI-compatible HTTP API. SIGTERM / SIGINT stop the
APIs (in-flight gRPC calls get 2 s), then the engine.

The worker plane is secure by default: `worker_keys_dir` must hold the CURVE keys
(`python -m ecoserve_common.curve init DIR`), or start-up stops with exit code 2 and a message
saying how to make them; `worker_plane_insecure` is the explicit opt-out (a plain socket any
peer that reaches it may use; for a trusted, isolated network only).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

from ecoserve_common.curve import HOW_TO_CREATE, KeysError, ServerKeys
from ecoserve_common.models import ModelMissing, resolve, served_name

from ..core import SchedulerCore, policy_from_spec
from ..store import RequestStore, create_schema, make_engine
from ..store_writer import StoreWriter
from .settings import SchedulerSettings

log = logging.getLogger("ecoserve_scheduler")


def worker_plane_keys(settings: SchedulerSettings) -> ServerKeys | None:
    """The worker plane's CURVE keys (None: insecure, only when asked for); KeysError when
    none are configured or they cannot be used."""
    if settings.worker_keys_dir:
        return ServerKeys.load(Path(settings.worker_keys_dir).expanduser())
    if settings.worker_plane_insecure:
        log.warning(
            "worker plane INSECURE (worker_plane_insecure): no encryption, any peer that reaches "
            "%s can register and read plans",
            settings.worker_bind,
        )
        return None
    raise KeysError(
        "no worker keys: set --worker-keys-dir (ECOSERVE_WORKER_KEYS_DIR) to a directory made by "
        f"{HOW_TO_CREATE}; workers use the same directory (or a copy of server.key and a worker "
        "key pair, services/worker/README.md). For a trusted, isolated network only: "
        "--worker-plane-insecure true (ECOSERVE_WORKER_PLANE_INSECURE)"
    )


def run(settings: SchedulerSettings, ready: threading.Event | None = None) -> int:
    from .api import SchedulerService, build_server
    from .engine import LiveEngine
    from .engine_client import EngineClient
    from .frontend import ApiLimits, Frontend
    from .prediction import PredictorClient
    from .tokenizer import ModelTokenizer

    root = Path(settings.models_dir).expanduser() if settings.models_dir else None
    model_dir = resolve(settings.model, root)  # ModelMissing before anything starts
    keys = worker_plane_keys(settings)  # KeysError before anything starts
    db = make_engine(settings.db_url)
    create_schema(db)
    store = RequestStore(db)
    lost = store.fail_unfinished("scheduler restarted before it finished", time.time())
    if lost:
        log.warning("%d requests of a previous run failed: scheduler restarted", lost)
    writer = StoreWriter(store)  # request threads queue; one thread writes batches
    writer.start()
    tokenizer = ModelTokenizer(model_dir)
    engine: LiveEngine | EngineClient
    if settings.engine_process:
        engine = EngineClient(
            settings.policy,
            settings.worker_bind,
            settings.worker_auth_token,
            settings.worker_timeout_s,
            settings.log_level,
            str(Path(settings.worker_keys_dir).expanduser()) if keys is not None else "",
        ).start()
    else:
        engine = LiveEngine(
            SchedulerCore(policy_from_spec(settings.policy)),
            settings.worker_bind,
            settings.worker_auth_token,
            settings.worker_timeout_s,
            keys=keys,
        ).start()
    predictor = PredictorClient(
        settings.predictor or None,
        settings.predictor_timeout_s,
        settings.default_response_tokens,
        2 * settings.default_response_tokens,
    )
    limits = ApiLimits(
        max_model_len=tokenizer.max_model_len,
        max_pending=settings.max_pending,
        vocab_size=tokenizer.vocab_size,
        queue_without_workers=settings.queue_without_workers,
    )
    frontend = Frontend(
        engine,
        tokenizer,
        writer,
        limits,
        predictor,
        store_prompts=settings.store_prompts,
        slo_classes=settings.slo_table(),
    )
    log.info(
        "SLO classes %s; a request that asks for none gets %s",
        frontend.slo_classes.as_dict(),
        frontend.slo_classes.default or "no SLO",
    )
    server, port = build_server(
        SchedulerService(frontend), settings.grpc_address, api_key=settings.api_key
    )
    server.start()
    http = None
    if settings.http_address:
        import uvicorn

        from .http_api import HttpLimits, create_app, uvicorn_config

        host, _, http_port = settings.http_address.rpartition(":")
        http_limits = HttpLimits(
            max_body_bytes=settings.http_max_body_bytes,
            header_timeout_s=settings.http_header_timeout_s,
        )
        app = create_app(
            frontend, served_name(settings.model), api_key=settings.api_key, limits=http_limits
        )
        http = uvicorn.Server(uvicorn_config(app, host, int(http_port), http_limits))
        http.install_signal_handlers = lambda: None  # this process's handlers stop it
        threading.Thread(target=http.run, name="http", daemon=True).start()
        log.info("OpenAI-compatible HTTP on http://%s/v1", settings.http_address)
    log.info(
        "scheduler ready: model %s (%s), gRPC port %d, workers connect to %s, policy %s, store %s",
        served_name(settings.model),
        model_dir,
        port,
        engine.address + (" (CURVE)" if keys is not None else " (INSECURE)"),
        settings.policy,
        settings.db_url.split("@")[-1],
    )
    stopped = threading.Event()
    if ready is not None:
        ready.set()

    def on_signal(signum, _frame) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stopped.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    if http is not None:
        http.should_exit = True
    server.stop(grace=2.0).wait()
    engine.stop()
    if not writer.close():
        log.error("store writer: %d writes not flushed at exit", writer.queued)
    predictor.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    settings = SchedulerSettings.load(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(settings)
    except (ModelMissing, KeysError) as exc:
        print(f"ecoserve-scheduler: cannot start: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
