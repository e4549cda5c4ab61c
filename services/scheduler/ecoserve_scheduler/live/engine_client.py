"""EngineClient: the front end's handle on an engine core running in its own process.

It offers what the front end uses of an in-process LiveEngine (`submit` → RequestHandle,
`cancel`, `pending`, `stats_snapshot`, `worker_ids`, `address`, `failure`, `stop`), so the
Frontend, the gRPC service and the HTTP app do not know which one they hold.

One reader thread takes the core's outputs (see engine_core) and hands each event to its
request's handle; callers' threads send commands through one PUSH socket under a lock (ZeroMQ
sockets are not thread-safe). The sockets are IPC endpoints in a fresh 0700 directory, new ones
for each core process ("generation"), so nothing queued for a dead core reaches the next.

If the core process dies or reports its loop dead, every request in flight ends
"failed: engine core ..." with the reason (none hangs), `failure` says why, `worker_ids()` is
empty and health checks report it; new requests fail at once with the same reason. Then the
reader starts a fresh core on the same worker address after a backoff (RESTART_BACKOFF_S,
doubling up to MAX_BACKOFF_S; back to the short delay after a core that ran STABLE_S), and
`failure` clears once it is ready. Workers find it on their own: its first answer to them is
"unregistered", and they register again.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from ..core.events import FinishEvent
from ..core.request import Request
from .engine import RequestHandle, close_handle
from .engine_core import AUTH_TOKEN_ENV

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
POLL_MS = 200  # how often the reader looks at the child when no output arrives
RESTART_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
STABLE_S = 30.0


class EngineCoreDied(RuntimeError):
    pass


class EngineClient:
    """`worker_keys_dir=""` runs the worker plane without CURVE: for tests only (`serve`
    refuses that unless `worker_plane_insecure`)."""

    def __init__(
        self,
        policy: str,
        worker_bind: str = "tcp://127.0.0.1:*",
        auth_token: str = "",
        worker_timeout_s: float = 2.0,
        log_level: str = "INFO",
        worker_keys_dir: str = "",
        restart: bool = True,
    ) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="ecoserve-engine-"))  # 0700: this user only
        self._ctx = zmq.Context()
        self._argv = [sys.executable, "-m", "ecoserve_scheduler.live.engine_core"]
        self._argv += ["--policy", policy, "--worker-timeout-s", str(worker_timeout_s)]
        self._argv += ["--log-level", log_level, "--worker-keys-dir", worker_keys_dir]
        self._bind = worker_bind
        self._env = {**os.environ, AUTH_TOKEN_ENV: auth_token}  # a secret: never in argv
        self._restart = restart
        self._generation = 0
        self._process: subprocess.Popen | None = None
        self._commands: zmq.Socket | None = None  # callers' threads, under _send_lock
        self._outputs: zmq.Socket | None = None  # the reader thread's
        self._started_s = 0.0
        self._send_lock = threading.Lock()
        self._handles: dict[str, RequestHandle] = {}
        self._handles_lock = threading.Lock()
        self._failure: str | None = None
        self._stopping = threading.Event()
        self.restarts = 0
        self.address = ""
        self.stats_snapshot: dict = {}
        self.clock = time.monotonic  # the core's clock: CLOCK_MONOTONIC is system-wide
        self._reader = threading.Thread(target=self._read, name="engine-client", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> EngineClient:
        """Start the core process and wait until it has bound the worker socket."""
        self._spawn(timeout_s)
        self._reader.start()
        return self

    def _spawn(self, timeout_s: float) -> None:
        """Start generation N+1 of the core on fresh sockets and wait for its "ready"."""
        self._generation += 1
        gen = self._generation
        commands, outputs = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        for sock, name in ((commands, "commands"), (outputs, "outputs")):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(f"ipc://{self._dir}/{name}-{gen}")
        argv = [*self._argv, "--worker-bind", self._bind, "--generation", str(gen)]
        argv += ["--commands", f"ipc://{self._dir}/commands-{gen}"]
        argv += ["--outputs", f"ipc://{self._dir}/outputs-{gen}"]
        proc = subprocess.Popen(argv, env=self._env)
        deadline = time.monotonic() + timeout_s
        address = ""
        try:
            while not address:
                if proc.poll() is not None:
                    raise EngineCoreDied(
                        f"engine core exited during start-up (exit code {proc.returncode}); "
                        "its log says why (e.g. the worker address is taken)"
                    )
                if time.monotonic() > deadline or self._stopping.is_set():
                    raise EngineCoreDied(f"engine core not ready after {timeout_s:g} s")
                if outputs.poll(POLL_MS):
                    message = pickle.loads(outputs.recv())
                    if message[0] == "ready":
                        address = message[1]
        except EngineCoreDied:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            commands.close()
            outputs.close()
            raise
        with self._send_lock:
            old = self._commands
            self._commands = commands
        if old is not None:
            old.close()  # with LINGER 0: what was queued for the dead core is dropped
        if self._outputs is not None:
            self._outputs.close()
        self._outputs, self._process, self._started_s = outputs, proc, time.monotonic()
        self.address = address
        self._bind = address  # a restart binds the port the workers already know
        with self._handles_lock:
            self._failure = None

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        proc = self._process
        if proc is not None and proc.poll() is None:
            self._send(("stop",))
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader.ident is not None:
            self._reader.join(timeout_s)
        proc = self._process  # the reader may have started another just before
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        with self._send_lock:
            for sock in (self._commands, self._outputs):
                if sock is not None:
                    sock.close()
            self._commands = None
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def failure(self) -> str | None:
        """Why the engine cannot serve (None while it can)."""
        return self._failure

    # ---- what the front end calls ------------------------------------------------------------

    def submit(self, request: Request) -> RequestHandle:
        handle = RequestHandle.of(request)
        with self._handles_lock:
            failure = self._failure
            if request.request_id in self._handles:
                failure = f"request {request.request_id!r} is already in the system"
            elif failure is None:
                self._handles[request.request_id] = handle
        if failure is not None:
            close_handle(handle, f"failed: {failure}")
            return handle
        self._send(("add", request))
        return handle

    def cancel(self, request_id: str) -> None:
        if self._failure is None:
            self._send(("abort", request_id))

    @property
    def pending(self) -> int:
        return len(self._handles)

    def worker_ids(self) -> list[str]:
        return [] if self._failure else list(self.stats_snapshot.get("workers", ()))

    # ---- internals ---------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            if self._commands is not None:
                self._commands.send(data)

    def _read(self) -> None:
        """Serve the current core's outputs; when it is gone, fail what it held and start
        another (unless stopping), with backoff."""
        backoff = RESTART_BACKOFF_S
        while True:
            why = self._pump()
            if self._stopping.is_set():
                why = "engine core stopped"
            else:
                log.error("%s: failing the requests it held", why)
            self._fail_held(why)
            if self._stopping.is_set() or not self._restart:
                return
            if time.monotonic() - self._started_s > STABLE_S:
                backoff = RESTART_BACKOFF_S
            while True:
                if self._stopping.wait(backoff):
                    return
                backoff = min(2 * backoff, MAX_BACKOFF_S)
                try:
                    self._spawn(READY_TIMEOUT_S)
                except EngineCoreDied as exc:
                    log.error("engine core restart failed: %s", exc)
                    self._failure = f"{why}; restart failed: {exc}"
                    continue
                self.restarts += 1
                log.warning("engine core restarted (generation %d)", self._generation)
                break

    def _pump(self) -> str:
        """Deliver the current core's outputs until it is gone; return why it is gone."""
        dead = ""
        proc, outputs = self._process, self._outputs
        assert proc is not None and outputs is not None
        while True:
            if not outputs.poll(POLL_MS):
                if proc.poll() is not None:
                    break
                continue
            kind, body = pickle.loads(outputs.recv())
            if kind == "events":
                self._deliver(body)
            elif kind == "stats":
                self.stats_snapshot = body
            elif kind == "dead":
                dead = body
                with self._handles_lock:
                    self._failure = f"engine core failed: {dead}"
        code = proc.wait()
        return f"engine core failed: {dead}" if dead else f"engine core exited (code {code})"

    def _fail_held(self, why: str) -> None:
        with self._handles_lock:
            self._failure = why
            held, self._handles = list(self._handles.values()), {}
        self.stats_snapshot = {**self.stats_snapshot, "workers": []}
        for handle in held:
            close_handle(handle, f"failed: {why}")

    def _deliver(self, events) -> None:
        for ev in events:
            handle = self._handles.get(ev.request_id)
            if handle is None:
                continue
            if isinstance(ev, FinishEvent):
                with self._handles_lock:
                    self._handles.pop(ev.request_id, None)
            handle.receive(ev)
