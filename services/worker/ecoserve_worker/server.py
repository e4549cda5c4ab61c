"""The worker process loop: a ZeroMQ DEALER that registers with the scheduler's ROUTER, then
executes every BatchPlan it is sent (decoded straight into StepInputs columns) and answers with
a StepResult.

Protocol (one protobuf Envelope per frame, see proto/worker.proto):

- connect: CURVE with `WorkerKeys` (this worker's key pair, the scheduler's public key), or
  the NULL mechanism without; no routing id of its own (the ROUTER gives each connection one,
  so no peer can take over another's); frames over MAX_FRAME_BYTES are refused.
- start: send Register (the backend's info, the auth token and a random `incarnation` for this
  process), wait for Registered; refused -> exit. Unanswered, Register is sent again every
  REGISTER_RETRY_S with a warning (the scheduler may be down, or the keys may not match).
- Plan -> execute -> StepResult. Heartbeat -> Heartbeat echoing the sender's `sent_s`, so the
  scheduler can time the round trip. When nothing has been sent for `heartbeat_s` (at most the
  scheduler's `Registered.heartbeat_s`), the worker sends its own Heartbeat (its clock in
  `sent_s`), during a long step too: a pulse thread takes the socket while `execute` runs.
- Drain: the step in flight is already done (one step at a time); later plans get an Error with
  code "draining". Shutdown: exit. `stop()` (SIGINT in the CLI) exits too.
- Leaving (`leave()`, SIGTERM in the CLI with --drain-timeout-s): the worker sends the scheduler
  a Drain of its own (again every REGISTER_RETRY_S, should one be lost) and keeps executing the
  plans it gets, which now only finish what runs here; it exits 0 on the scheduler's Shutdown,
  on "unregistered" (nothing of its runs there), or when the deadline passes (the scheduler
  then drops it as silent and recomputes what was left elsewhere).
- Error "unregistered" (a restarted scheduler does not know this worker): send Register again
  and keep serving; the Registered that answers it is checked like the first one. While one
  Register is unanswered (less than REGISTER_RETRY_S old), further "unregistered" replies send
  none: a burst of them must not become a burst of registrations.
- A frame that cannot be used gets an Error reply with its code ("malformed", "version",
  "unknown", "invalid") and the loop goes on: bad input never kills the worker.

Invariant: the socket is used by one thread at a time. The loop thread holds `_sock_lock`
except while the backend executes a step; the pulse thread only sends while it holds it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Protocol

import zmq

from ecoserve_common.curve import WorkerKeys, connect_curve, limit_frames
from ecoserve_common.pb import worker_pb2 as pb
from ecoserve_common.plan import StepInputs, StepResult
from ecoserve_common.wire import WireError, decode, encode, result_to_proto, step_inputs_from_proto

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REFUSED = 1
REGISTER_RETRY_S = 5.0  # an unanswered Register is sent again after this long


class Backend(Protocol):
    def info(self) -> dict[str, Any]: ...

    def execute(self, step: StepInputs) -> StepResult: ...


class WorkerServer:
    """`keys=None` is the NULL mechanism: only against a scheduler run insecure, or tests."""

    def __init__(
        self,
        scheduler_addr: str,
        worker_id: str,
        backend: Backend,
        auth_token: str = "",
        heartbeat_s: float = 0.5,
        poll_s: float = 0.05,
        context: zmq.Context | None = None,
        linger_ms: int = 200,
        keys: WorkerKeys | None = None,
    ) -> None:
        self.scheduler_addr = scheduler_addr
        self.worker_id = worker_id
        self.backend = backend
        self.auth_token = auth_token
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s  # longest wait before checking stop(): bounds shutdown latency
        self.linger_ms = linger_ms
        self.keys = keys
        self.incarnation = secrets.token_hex(8)  # this process's start, as Register says
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._stop = threading.Event()
        self._sock: zmq.Socket | None = None
        self._sock_lock = threading.Lock()  # the loop holds it except inside execute()
        self._last_sent = 0.0
        self._register_sent: float | None = None  # when the unanswered Register went out
        self.registers_sent = 0
        self.draining = False
        self.registered = False  # accepted by the scheduler, not yet told "unregistered"
        self.last_loop_s = time.monotonic()  # the loop's last round: what liveness reads
        self._leave = threading.Event()  # set by leave(): drain here, then exit
        self._leave_timeout_s = 0.0
        self._leaving_since: float | None = None
        self._drain_sent: float | None = None
        self.steps_done = 0
        self._exit_code = EXIT_OK  # what run() returns when _serve ends on a frame

    # ---- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask run() to return (safe from a signal handler or another thread)."""
        self._stop.set()

    def leave(self, timeout_s: float) -> None:
        """Leave gracefully: have the scheduler drain this worker, exit when it is done or
        after `timeout_s` (safe from a signal handler or another thread)."""
        self._leave_timeout_s = timeout_s
        self._leave.set()

    @property
    def leaving(self) -> bool:
        return self._leave.is_set()

    def status(self) -> dict[str, Any]:
        """What the probes read (health.py): the state, how long since the loop went round."""
        state = "leaving" if self.leaving else "ready" if self.registered else "registering"
        return {
            "state": state,
            "worker_id": self.worker_id,
            "steps": self.steps_done,
            "since_loop_s": round(time.monotonic() - self.last_loop_s, 3),
        }

    def run(self) -> int:
        """Register, then serve until Shutdown or stop(). Returns an exit code (0 ok, 1 refused)."""
        self._sock_lock.acquire()
        self._sock = self._connect()
        pulse = threading.Thread(target=self._pulse, name="worker-pulse", daemon=True)
        pulse.start()
        try:
            code = self._register()
            if code is not None:
                return code
            return self._serve()
        finally:
            self._stop.set()  # ends the pulse thread too
            self._sock.close(linger=self.linger_ms)
            self._sock = None
            self._sock_lock.release()
            pulse.join(2)
            if self._own_context:
                self._context.term()
            log.info("worker %s stopped after %d steps", self.worker_id, self.steps_done)

    def _connect(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        limit_frames(sock)
        if self.keys is not None:
            connect_curve(sock, self.keys)
        sock.connect(self.scheduler_addr)
        log.info(
            "worker %s connecting to %s (%s)",
            self.worker_id,
            self.scheduler_addr,
            "CURVE" if self.keys is not None else "INSECURE: no keys",
        )
        return sock

    def _register(self) -> int | None:
        """Send Register and wait for Registered: None once accepted, else the exit code
        (EXIT_REFUSED when refused, EXIT_OK on Shutdown or stop() before an answer)."""
        self._send_register()
        while not self._stop.is_set():
            self.last_loop_s = time.monotonic()
            if self.leaving:  # nothing runs here yet: nothing to drain
                log.info("leaving before registration")
                return EXIT_OK
            msg = self._recv(self.poll_s)
            if msg is None:
                if time.monotonic() - (self._register_sent or 0.0) >= REGISTER_RETRY_S:
                    log.warning(
                        "no answer from the scheduler at %s in %.0fs: is it up, and does it "
                        "allow this worker's key (its server.key here, this key in its "
                        "workers/)? registering again",
                        self.scheduler_addr,
                        REGISTER_RETRY_S,
                    )
                    self._send_register()
                continue
            env, body = msg
            if body == "registered":
                return self._on_registered(env.registered)
            if body == "shutdown":
                log.info("shutdown before registration")
                return EXIT_OK
            log.debug("ignoring %s before registration", body)
        return EXIT_OK

    def _on_registered(self, reply: pb.Registered) -> int | None:
        if not reply.accepted:
            log.error("scheduler refused worker %s: %s", self.worker_id, reply.reason)
            self._exit_code = EXIT_REFUSED
            return EXIT_REFUSED
        if self._register_sent is not None:  # a duplicate acknowledgement logs nothing
            log.info("worker %s registered with %s", self.worker_id, self.scheduler_addr)
        self._register_sent = None
        self.registered = True
        if 0 < reply.heartbeat_s < self.heartbeat_s:
            self.heartbeat_s = reply.heartbeat_s  # the scheduler's timeout decides
        return None

    def _serve(self) -> int:
        while not self._stop.is_set():
            self.last_loop_s = time.monotonic()
            if self.leaving and self._leave_due():
                return EXIT_OK
            idle_for = time.monotonic() - self._last_sent
            wait = min(self.poll_s, max(0.0, self.heartbeat_s - idle_for))
            msg = self._recv(wait)
            if msg is not None and not self._handle(*msg):
                return self._exit_code
            if time.monotonic() - self._last_sent >= self.heartbeat_s:
                self._send(pb.Heartbeat(sent_s=time.time(), steps_done=self.steps_done))
        return EXIT_OK

    def _leave_due(self) -> bool:
        """Leaving: (re)send Drain; True once the deadline has passed."""
        now = time.monotonic()
        if self._leaving_since is None:
            self._leaving_since = now
            log.info(
                "leaving: asking the scheduler to drain this worker (at most %gs)",
                self._leave_timeout_s,
            )
        if self._drain_sent is None or now - self._drain_sent >= REGISTER_RETRY_S:
            self._drain_sent = now
            self._send(pb.Drain())
        if now - self._leaving_since < self._leave_timeout_s:
            return False
        log.warning(
            "drain not over after %gs: exiting; the scheduler recomputes what is left elsewhere",
            self._leave_timeout_s,
        )
        return True

    # ---- frames --------------------------------------------------------------------------

    def _handle(self, env: pb.Envelope, body: str) -> bool:
        """Act on one frame; False means exit."""
        if body == "plan":
            self._on_plan(env.plan)
        elif body == "heartbeat":
            self._send(pb.Heartbeat(sent_s=env.heartbeat.sent_s, steps_done=self.steps_done))
        elif body == "drain":
            log.info("draining: no more plans accepted")
            self.draining = True
        elif body == "shutdown":
            log.info("shutdown requested by the scheduler")
            return False
        elif body == "registered":  # answers a re-registration
            if self._on_registered(env.registered) is not None:
                return False
        elif body == "error" and env.error.code == "unregistered" and self.leaving:
            log.info("the scheduler no longer knows this leaving worker: nothing left to drain")
            return False
        elif body == "error" and env.error.code == "unregistered":
            self.registered = False
            pending = self._register_sent
            if pending is None or time.monotonic() - pending >= REGISTER_RETRY_S:
                log.warning("scheduler does not know this worker (restarted?): registering again")
                self._send_register()
        elif body == "error":  # logged, never answered: two peers must not trade Errors forever
            log.warning("scheduler reported %s: %s", env.error.code, env.error.message)
        else:
            self._send_error("unknown", f"a worker does not take {body} frames")
        return True

    def _on_plan(self, msg: pb.BatchPlan) -> None:
        if self.draining:
            self._send_error("draining", "worker is draining", msg.step_id)
            return
        try:  # the plan's columns, as they are on the wire: the backend reads them as such
            step = step_inputs_from_proto(msg, self.worker_id)
        except WireError as e:
            log.warning("bad plan %d: %s", msg.step_id, e)
            self._send_error(e.code, e.message, msg.step_id)
            return
        self._sock_lock.release()  # the pulse thread may heartbeat while the step runs
        try:
            result = self.backend.execute(step)
        finally:
            self._sock_lock.acquire()
        self.steps_done += 1
        self._send(result_to_proto(result))

    def _pulse(self) -> None:
        """Heartbeat while a step runs (the loop heartbeats when idle): a long prefill must not
        look like a dead worker. Takes the socket only while the loop has let go of it."""
        while not self._stop.wait(min(self.heartbeat_s, 1.0) / 2):
            if not self._sock_lock.acquire(blocking=False):
                continue  # the loop has the socket: it heartbeats itself
            try:
                if (
                    self._sock is not None
                    and time.monotonic() - self._last_sent >= self.heartbeat_s
                ):
                    self._send(pb.Heartbeat(sent_s=time.time(), steps_done=self.steps_done))
            finally:
                self._sock_lock.release()

    def _recv(self, timeout_s: float) -> tuple[pb.Envelope, str] | None:
        """The next usable frame, or None (timeout, or a bad frame already answered)."""
        if not self._sock.poll(int(timeout_s * 1000)):
            return None
        frame = self._sock.recv()
        try:
            return decode(frame)
        except WireError as e:
            log.warning("bad frame (%d bytes): %s", len(frame), e)
            self._send_error(e.code, e.message)
            return None

    def _send_register(self) -> None:
        self._register_sent = time.monotonic()
        self.registers_sent += 1
        self._send(
            pb.Register(
                auth_token=self.auth_token, incarnation=self.incarnation, **self.backend.info()
            )
        )

    def _send_error(self, code: str, message: str, step_id: int = 0) -> None:
        self._send(pb.Error(code=code, message=message, step_id=step_id))

    def _send(self, body) -> None:
        # Never block: with the scheduler gone the queue fills up, and a blocked send would
        # keep stop() from working. A dropped frame is what a dead peer would lose anyway.
        try:
            self._sock.send(encode(self.worker_id, body), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("send queue full: dropped a %s frame", type(body).__name__)
        self._last_sent = time.monotonic()
