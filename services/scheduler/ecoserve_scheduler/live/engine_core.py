"""The engine core in its own process (as vLLM v1's EngineCore): queues, ledger, plans, worker I/O.

Why a process: the front end (HTTP and gRPC threads, tokenisation, detokenisation, the store)
and the engine loop shared one GIL, so every streamed token's handling competed with the loop
that sends the workers their next plan. Here the loop's process does nothing else.

`python -m ecoserve_scheduler.live.engine_core` is the child (`EngineClient` starts it as a
plain subprocess: it starts clean, with no grpc or uvicorn threads forked and without
re-importing the parent's main module as multiprocessing's "spawn" would; the worker secret
comes in the environment, never argv). It connects to two IPC sockets the front end bound in a
private (0700) directory:

- commands, PULL: ("add", Request), ("abort", request_id), ("stop",);
- outputs, PUSH: ("ready", worker_address), ("events", [TokenEvent | FinishEvent |
  PreemptEvent, ...]) in the order the core raised them, ("stats", dict) every STATS_EVERY_S.

Messages are pickled: both ends are this program, and only this user can reach the sockets
(their directory is 0700). Invariant: only the loop thread touches the core and every socket.
The child ignores SIGINT (the front end decides when to stop) and exits when its parent is
gone, so no engine outlives the front end whose requests it holds.

When the loop fails (anything unexpected), the child sends ("dead", reason) and exits 1; the
front end fails what it held with that reason and starts a fresh core (engine_client).
Workers' keys come from `--worker-keys-dir` (a path; the files hold the secrets), the shared
worker secret from the environment: neither is ever in argv. Test hook: with
ECOSERVE_ENGINE_CORE_TEST_CRASH_AFTER_STEPS=N the first core (`--generation 1`) raises inside
its loop once it has run N steps, so the recovery path can be tested end to end.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import signal
import sys

import zmq

from ecoserve_common.curve import ServerKeys

from ..core import SchedulerCore, policy_from_spec
from ..core.events import FinishEvent
from .engine import LiveEngine

log = logging.getLogger(__name__)


class EngineCore(LiveEngine):
    """A LiveEngine whose callers live in another process: commands arrive on `commands`,
    events and stats leave on `outputs` instead of through RequestHandles."""

    def __init__(
        self,
        core: SchedulerCore,
        commands: zmq.Socket,
        outputs: zmq.Socket,
        crash_after_steps: int | None = None,
        **kw,
    ):
        super().__init__(core, **kw)
        self._commands = commands
        self._outputs = outputs
        self._live: set[str] = set()  # requests added and not yet finished
        self._parent = os.getppid()
        self._crash_after_steps = crash_after_steps  # the test hook (module docstring)

    # Woken by a command or a worker's frame, so an idle core need not spin: with the 2 ms
    # wait of an in-process engine it took 8% of a core doing nothing.
    idle_poll_s = 0.05

    def _wake_sockets(self) -> tuple[zmq.Socket, ...]:
        return (self._commands,)

    def _send(self, message: tuple) -> None:
        self._outputs.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def _drain_inbox(self) -> None:
        now = None
        while True:
            try:
                message = pickle.loads(self._commands.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            now = self.clock()
            kind = message[0]
            if kind == "add":
                request = message[1]
                try:
                    events = self.core.add(request, now)
                except ValueError as exc:  # duplicate id: the caller hears why
                    self._send(("events", [FinishEvent(request.request_id, f"failed: {exc}")]))
                    continue
                self._live.add(request.request_id)
                self._deliver(events)
            elif kind == "abort":
                self._deliver(self.core.abort(message[1], now))
            elif kind == "stop":
                self._stop.set()
                return

    def _deliver(self, events) -> None:
        out = []
        for ev in events:
            if ev.request_id not in self._live:
                continue
            out.append(ev)
            if isinstance(ev, FinishEvent):
                self._live.discard(ev.request_id)
                self.core.release(ev.request_id)
        if out:
            self._send(("events", out))

    def _dispatch(self, now: float) -> None:
        if self._crash_after_steps is not None and self.steps >= self._crash_after_steps:
            raise RuntimeError(f"test crash after {self.steps} steps ({CRASH_ENV})")
        super()._dispatch(now)

    def _die(self, reason: str) -> None:
        self._failure = reason
        self._send(("dead", reason))  # the front end fails the requests it holds

    def _publish_stats(self) -> None:
        super()._publish_stats()
        self._send(("stats", self.stats_snapshot))
        if os.getppid() != self._parent:  # the front end is gone: nobody to serve
            log.warning("engine core: front end exited; stopping")
            self._stop.set()


def run_engine_core(
    policy: str,
    worker_bind: str,
    auth_token: str,
    worker_timeout_s: float,
    commands_address: str,
    outputs_address: str,
    log_level: str = "INFO",
    keys_dir: str = "",
    crash_after_steps: int | None = None,
) -> int:
    """The child process: build the core, connect to the front end, run the loop until told to
    stop (or the front end is gone). Returns the exit code: 1 when the loop failed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s engine-core %(name)s: %(message)s",
    )
    keys = ServerKeys.load(keys_dir) if keys_dir else None  # KeysError: start-up fails, said
    ctx = zmq.Context()
    commands = ctx.socket(zmq.PULL)
    outputs = ctx.socket(zmq.PUSH)
    for sock, address in ((commands, commands_address), (outputs, outputs_address)):
        sock.setsockopt(zmq.LINGER, 1000)  # the last events still reach a front end that waits
        sock.connect(address)
    engine = EngineCore(
        SchedulerCore(policy_from_spec(policy)),
        commands,
        outputs,
        crash_after_steps,
        bind=worker_bind,
        auth_token=auth_token,
        worker_timeout_s=worker_timeout_s,
        context=ctx,
        keys=keys,
    )
    engine._send(("ready", engine.address))
    try:
        engine._run()  # in this thread: the process exists for this loop
    finally:
        engine._plane.close()
        commands.close()
        outputs.close()
        ctx.term()
    return 1 if engine._failure else 0


AUTH_TOKEN_ENV = "ECOSERVE_WORKER_AUTH_TOKEN"
CRASH_ENV = "ECOSERVE_ENGINE_CORE_TEST_CRASH_AFTER_STEPS"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ecoserve_scheduler.live.engine_core")
    p.add_argument("--policy", required=True)
    p.add_argument("--worker-bind", required=True)
    p.add_argument("--worker-timeout-s", type=float, required=True)
    p.add_argument("--worker-keys-dir", default="", help="CURVE keys; empty: NULL mechanism")
    p.add_argument("--commands", required=True, help="ipc:// address the front end bound")
    p.add_argument("--outputs", required=True, help="ipc:// address the front end bound")
    p.add_argument("--generation", type=int, default=1, help="1 + restarts before this one")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    crash = os.environ.get(CRASH_ENV)
    return run_engine_core(
        a.policy,
        a.worker_bind,
        os.environ.get(AUTH_TOKEN_ENV, ""),
        a.worker_timeout_s,
        a.commands,
        a.outputs,
        a.log_level,
        a.worker_keys_dir,
        int(crash) if crash and a.generation == 1 else None,
    )


if __name__ == "__main__":
    sys.exit(main())
