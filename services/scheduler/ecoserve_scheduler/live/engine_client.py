"""EngineClient: the front end's handle on an engine core running in its own process.

It offers what the front end uses of an in-process LiveEngine (`submit` → RequestHandle,
`cancel`, `pending`, `stats_snapshot`, `worker_ids`, `address`, `failure`, `stop`), so the
Frontend, the gRPC service and the HTTP app do not know which one they hold.

One reader thread takes the core's outputs (see engine_core) and hands each event to its
request's handle; callers' threads send commands through one PUSH socket under a lock (ZeroMQ
sockets are not thread-safe). The sockets are IPC endpoints in a fresh 0700 directory.

If the core process dies, every request in flight ends "failed: engine core exited ..." (none
hangs), `failure` says why, `worker_ids()` is empty, and health checks report it; new
requests fail at once with the same reason.
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

from ..core.events import FinishEvent, TokenEvent
from ..core.request import Request
from .engine import RequestHandle
from .engine_core import AUTH_TOKEN_ENV

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
POLL_MS = 200  # how often the reader looks at the child when no output arrives


class EngineCoreDied(RuntimeError):
    pass


class EngineClient:
    def __init__(
        self,
        policy: str,
        worker_bind: str = "tcp://127.0.0.1:*",
        auth_token: str = "",
        worker_timeout_s: float = 10.0,
        log_level: str = "INFO",
    ) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="ecoserve-engine-"))  # 0700: this user only
        self._ctx = zmq.Context()
        self._commands = self._ctx.socket(zmq.PUSH)
        self._outputs = self._ctx.socket(zmq.PULL)
        commands_address = f"ipc://{self._dir}/commands"
        outputs_address = f"ipc://{self._dir}/outputs"
        self._commands.setsockopt(zmq.LINGER, 0)
        self._outputs.setsockopt(zmq.LINGER, 0)
        self._commands.bind(commands_address)
        self._outputs.bind(outputs_address)
        self._argv = [sys.executable, "-m", "ecoserve_scheduler.live.engine_core"]
        self._argv += ["--policy", policy, "--worker-bind", worker_bind]
        self._argv += ["--worker-timeout-s", str(worker_timeout_s), "--log-level", log_level]
        self._argv += ["--commands", commands_address, "--outputs", outputs_address]
        self._env = {**os.environ, AUTH_TOKEN_ENV: auth_token}  # a secret: never in argv
        self._process: subprocess.Popen | None = None
        self._send_lock = threading.Lock()
        self._handles: dict[str, RequestHandle] = {}
        self._handles_lock = threading.Lock()
        self._failure: str | None = None
        self._stopping = False
        self.address = ""
        self.stats_snapshot: dict = {}
        self.clock = time.monotonic  # the core's clock: CLOCK_MONOTONIC is system-wide
        self._reader = threading.Thread(target=self._read, name="engine-client", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> EngineClient:
        """Start the core process and wait until it has bound the worker socket."""
        self._process = proc = subprocess.Popen(self._argv, env=self._env)
        deadline = time.monotonic() + timeout_s
        while not self.address:
            if proc.poll() is not None:
                raise EngineCoreDied(
                    f"engine core exited during start-up (exit code {proc.returncode}); "
                    "its log says why (e.g. the worker address is taken)"
                )
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise EngineCoreDied(f"engine core not ready after {timeout_s:g} s")
            if self._outputs.poll(POLL_MS):
                message = pickle.loads(self._outputs.recv())
                if message[0] == "ready":
                    self.address = message[1]
        self._reader.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        proc = self._process
        if proc is not None and proc.poll() is None:
            self._send(("stop",))
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader.ident is not None:
            self._reader.join(2)
        self._commands.close()
        self._outputs.close()
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
        handle = RequestHandle(request.request_id)
        with self._handles_lock:
            failure = self._failure
            if request.request_id in self._handles:
                failure = f"request {request.request_id!r} is already in the system"
            elif failure is None:
                self._handles[request.request_id] = handle
        if failure is not None:
            _finish(handle, f"failed: {failure}")
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
            self._commands.send(data)

    def _read(self) -> None:
        while True:
            if not self._outputs.poll(POLL_MS):
                if self._process is None or self._process.poll() is not None:
                    break
                continue
            kind, body = pickle.loads(self._outputs.recv())
            if kind == "events":
                self._deliver(body)
            elif kind == "stats":
                self.stats_snapshot = body
        code = None if self._process is None else self._process.returncode
        why = "engine core stopped" if self._stopping else f"engine core exited (code {code})"
        if not self._stopping:
            log.error("%s: failing the requests it held", why)
        with self._handles_lock:
            self._failure = why
            held, self._handles = list(self._handles.values()), {}
        for handle in held:
            _finish(handle, f"failed: {why}")

    def _deliver(self, events) -> None:
        for ev in events:
            handle = self._handles.get(ev.request_id)
            if handle is None:
                continue
            if isinstance(ev, TokenEvent):
                handle.tokens.append(ev.token_id)
                handle.events.put(ev)
            elif isinstance(ev, FinishEvent):
                with self._handles_lock:
                    self._handles.pop(ev.request_id, None)
                _finish(handle, ev.reason)
            else:  # PreemptEvent: the stream pauses, nothing repeats
                handle.events.put(ev)


def _finish(handle: RequestHandle, reason: str) -> None:
    handle.finish_reason = reason
    handle.events.put(FinishEvent(handle.request_id, reason))
    handle.done.set()
