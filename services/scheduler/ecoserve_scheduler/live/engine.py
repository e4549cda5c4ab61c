"""LiveEngine: one thread that drives a SchedulerCore against real workers over ZeroMQ.

The core decides; this loop only moves frames and reads the clock:

- the worker plane (`worker_plane.WorkerPlane`: a ROUTER; CURVE with allow-listed keys when
  given `ServerKeys`) receives Register / StepResult / Heartbeat / Error from DEALER workers,
  each frame with its connection's key; a registered worker's frames must carry the key it
  registered with;
- Register is checked (worker id, shared secret, pool) and becomes `core.add_worker`. It is
  idempotent: the same process (same key and `incarnation`) registering again is only
  acknowledged (on a new connection its step in flight fails: plan or result may be lost); a
  new incarnation under a live id is a restart, removed first (requests recomputed), re-added;
- every registered worker with no step in flight gets `core.schedule(worker, now)`; a result
  goes to `core.update`, whose events reach each request's handle;
- a worker silent for `worker_timeout_s` (plus twice its slowest step while one is in flight)
  is dropped with `core.remove_worker`: its in-flight requests run elsewhere. Workers heartbeat
  every timeout/4 (`Registered.heartbeat_s`), during steps too. Time the loop itself did not
  run (a stalled process) does not count as their silence;
- an Error that answers a plan (draining, invalid) fails that step, as a failed step result;
- a worker's own Drain (it is leaving: SIGTERM in a rolling update) makes it admit nothing new;
  once what runs there has finished it is removed and sent Shutdown (drain.py);
- frames from an unregistered peer get Error "unregistered" (the worker then registers again);
  strangers' Registers and the replies they get are rationed by the plane; the rest dropped.

Anything unexpected inside the loop (a core method raising, a bug) marks the engine dead:
`failure` says why (health checks answer 503), every request it held fails with that reason,
new ones fail at once. It is never silently gone while health says ok.

Other threads talk to the loop only through `submit` / `cancel` (a thread-safe queue); each
request's events arrive on its own `RequestHandle` queue (handle.py). Invariant: only the loop
thread touches the core and the socket.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import zmq

from ecoserve_common.curve import ServerKeys
from ecoserve_common.pb import worker_pb2 as pb
from ecoserve_common.wire import WireError, decode, encode, plan_to_proto, result_from_proto

from ..core import SchedulerCore, StepResult, WorkerSpec
from ..core.events import FinishEvent
from ..core.request import Request
from .drain import Drains
from .handle import RequestHandle, close_handle
from .worker_plane import Inbound, WorkerConn, WorkerPlane, refusal

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.002  # longest wait for a frame when no command is pending
FRAMES_PER_TICK = 64  # take what is there, but never starve the rest of the loop
STATS_EVERY_S = 0.05
STALL_S = 0.5  # a loop iteration this late means the loop, not the workers, was silent


class LiveEngine:
    """`keys=None` is the NULL mechanism (no encryption, no peer keys): for tests in one
    process only. The services (`serve`) refuse to run that way unless told to."""

    def __init__(
        self,
        core: SchedulerCore,
        bind: str = "tcp://127.0.0.1:*",
        auth_token: str = "",
        worker_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        context: zmq.Context | None = None,
        keys: ServerKeys | None = None,
    ) -> None:
        self.core = core
        self.auth_token = auth_token
        self.worker_timeout_s = worker_timeout_s
        self.clock = clock
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._plane = WorkerPlane(self._ctx, bind, keys)
        self.address = self._plane.address
        self._workers: dict[str, WorkerConn] = self._plane.workers  # the plane's, by worker id
        self._inbox: queue.Queue = queue.Queue()
        self._handles: dict[str, RequestHandle] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-engine", daemon=True)
        self._failure: str | None = None
        self.workers_dropped = 0
        self.drains = Drains(core)  # workers leaving on their own: admit nothing, then Shutdown
        self.core_s = 0.0  # time inside core.schedule / core.update (scheduler overhead)
        self.forward_s = 0.0  # workers' reported step time
        self.steps = 0
        self.decode_tokens = 0  # tokens planned: with forward_s, the workers' speed in situ
        self.prefill_tokens = 0
        self._pending = 0  # submitted, not yet finished: admission control reads it
        self._pending_lock = threading.Lock()  # also orders submit against the loop's death
        self.stats_snapshot: dict = {}  # the core's stats, refreshed by the loop
        self._stats_at = 0.0
        self._tick_at = 0.0

    # ---- other threads -----------------------------------------------------------------------

    def start(self) -> LiveEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(10)
        self._plane.close()
        if self._own_context:
            self._ctx.term()

    def submit(self, request: Request) -> RequestHandle:
        handle = RequestHandle.of(request)
        with self._pending_lock:
            failure = self._failure
            if failure is None:
                self._pending += 1
                self._inbox.put(("add", request, handle))
        if failure is not None:
            close_handle(handle, f"failed: {failure}")
        return handle

    @property
    def pending(self) -> int:
        return self._pending

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    def worker_ids(self) -> list[str]:
        return [] if self._failure else list(self._workers)

    @property
    def failure(self) -> str | None:
        """Why the engine cannot serve (None while it can): health checks report it."""
        if self._failure is None and self._thread.ident and not self._thread.is_alive():
            return "engine loop exited"
        return self._failure

    # ---- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # anything unexpected: dead, and saying so (never silently)
            log.exception("engine loop failed")
            self._die(f"engine loop failed: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._plane.sock, zmq.POLLIN)
        for sock in self._wake_sockets():
            poller.register(sock, zmq.POLLIN)
        idle_ms, plane_ready = self.idle_poll_s * 1000, (self._plane.sock, zmq.POLLIN)
        self._tick_at = self.clock()
        while not self._stop.is_set():
            self._drain_inbox()
            for i in range(FRAMES_PER_TICK):
                if plane_ready not in poller.poll(0 if i else idle_ms):  # a wake socket only
                    break
                inbound = self._plane.read()
                if inbound is not None:
                    self._on_inbound(inbound)
            now = self.clock()
            self._forgive_stall(now)
            self._drop_silent(now)
            self._dispatch(now)
            self._shut_drained()
            if now - self._stats_at > STATS_EVERY_S:
                self._stats_at = now
                self._publish_stats()

    # The longest wait for a frame. In-process callers put commands on a queue the poll cannot
    # see, so it stays short; a subclass whose commands arrive on sockets (`_wake_sockets`) is
    # woken by them and may idle longer.
    idle_poll_s = IDLE_POLL_S

    def _wake_sockets(self) -> tuple[zmq.Socket, ...]:
        return ()

    def _die(self, reason: str) -> None:
        """The loop is over: fail every request held or still queued; later submits fail."""
        with self._pending_lock:
            self._failure = reason
        held, self._handles = list(self._handles.values()), {}
        while True:
            try:
                kind, _, handle = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                held.append(handle)
        for handle in held:
            self._finish(handle, f"failed: {reason}")

    def _publish_stats(self) -> None:
        self.stats_snapshot = {
            **self.core.stats(),
            "workers": list(self._workers),
            "draining": self.drains.running(),  # worker id -> requests still running there
            "engine": {
                "steps": self.steps,
                "core_s": self.core_s,
                "forward_s": self.forward_s,
                "decode_tokens": self.decode_tokens,
                "prefill_tokens": self.prefill_tokens,
                "workers_dropped": self.workers_dropped,
                "workers_drained": self.drains.drained,
                "frames_dropped": self._plane.dropped,
                "worker_plane_secure": self._plane.secure,
            },
        }

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, arg, handle = self._inbox.get_nowait()
            except queue.Empty:
                return
            now = self.clock()
            if kind == "add":
                self._handles[arg.request_id] = handle
                try:
                    self._deliver(self.core.add(arg, now))
                except ValueError as exc:  # duplicate id: the caller hears why
                    self._finish(handle, f"failed: {exc}")
                    del self._handles[arg.request_id]
            else:
                self._deliver(self.core.abort(arg, now))

    def _dispatch(self, now: float) -> None:
        self._deliver(self._send_plans(now))

    def _send_plans(self, now: float) -> list:
        """Plan and send a step to every idle worker; return the events scheduling raised."""
        events: list = []
        for wid, w in self._workers.items():
            if self.core.workers[wid].in_flight is not None:
                continue
            t0 = time.perf_counter()
            plan, raised = self.core.schedule(wid, now)
            self.core_s += time.perf_counter() - t0
            events += raised
            if plan is not None:
                self.decode_tokens += len(plan.decodes)
                self.prefill_tokens += plan.num_tokens - len(plan.decodes)
                w.plan_sent_s = now
                self._plane.send(w, encode("scheduler", plan_to_proto(plan)))
        return events

    def _forgive_stall(self, now: float) -> None:
        """A loop that did not run for a while read no heartbeats: that silence is its own."""
        gap, self._tick_at = now - self._tick_at, now
        if gap > STALL_S:
            log.warning("engine loop stalled %.1fs: workers' silence during it not counted", gap)
            for w in self._workers.values():
                w.last_seen += gap

    def _drop_silent(self, now: float) -> None:
        for wid, w in list(self._workers.items()):
            limit = self.worker_timeout_s
            if self.core.workers[wid].in_flight is not None:
                limit += 2 * w.slowest_step_s  # a step its heartbeats might not cover
            if now - w.last_seen > limit:
                log.warning("worker %s silent for %.1fs: dropped", wid, now - w.last_seen)
                self._remove(wid, now)

    def _remove(self, wid: str, now: float) -> None:
        self._plane.remove(wid)
        self.drains.forget(wid)
        self.workers_dropped += 1
        self._deliver(self.core.remove_worker(wid, now))

    def _shut_drained(self) -> None:
        """Draining workers with nothing left to run leave: out of the core (nothing to
        recompute), then Shutdown, which the worker exits 0 on."""
        for wid in self.drains.done():
            self._plane.send(self._workers[wid], encode("scheduler", pb.Shutdown()))
            self._plane.remove(wid)
            self.drains.left(wid)
            self._deliver(self.core.remove_worker(wid, self.clock()))
            log.info("worker %s drained: shut down", wid)

    # ---- frames ------------------------------------------------------------------------------

    def _on_inbound(self, inb: Inbound) -> None:
        now = self.clock()
        w = inb.worker
        if w is not None and inb.key != w.key:
            # Not possible while routing ids are the ROUTER's own; should it happen, this
            # connection is not the one that registered, and no plan may go there again.
            log.error("worker %s: a frame with another key on its connection: dropped", w.worker_id)
            self._remove(w.worker_id, now)
            return
        try:
            env, body = decode(inb.data)
        except WireError as e:
            self._reply(inb, pb.Error(code=e.code, message=e.message), now)
            return
        if body == "register":
            if self._plane.may_register(inb, now):
                self._on_register(inb, env, now)
            return
        if w is None:
            self._reply(inb, pb.Error(code="unregistered", message="register first"), now)
            return
        w.last_seen = now
        wid = w.worker_id
        if body == "result":
            w.steps += 1
            w.slowest_step_s = max(w.slowest_step_s, now - w.plan_sent_s)
            try:
                result = result_from_proto(env.result, wid)
            except WireError as e:  # its columns do not fit: the step failed
                result = StepResult(env.result.step_id, wid, (), 0.0, e.message)
            t0 = time.perf_counter()
            events = self.core.update(result, now)
            self.core_s += time.perf_counter() - t0
            self.steps += 1
            self.forward_s += result.forward_s
            # The worker idles until its next plan: send it before handing the tokens on, since
            # each put wakes a streaming thread that then competes with this loop for the GIL
            # (measured on 2 cores: result-to-next-plan went from 2.05 ms to 0.37 ms a step).
            self._deliver(events + self._send_plans(now))
        elif body == "error" and env.error.step_id:
            self._fail_step(wid, env.error.step_id, f"{env.error.code}: {env.error.message}", now)
        elif body == "error":
            log.warning("worker %s reported %s: %s", wid, env.error.code, env.error.message)
        elif body == "drain":  # the worker is leaving (a repeated Drain changes nothing)
            if self.drains.start(wid, now):
                n = len(self.core.workers[wid].running)
                log.info("worker %s draining: admits nothing new, %d request(s) to finish", wid, n)
        elif body != "heartbeat":
            self._reply(inb, pb.Error(code="unknown", message=f"a scheduler takes no {body}"), now)

    def _on_register(self, inb: Inbound, env: pb.Envelope, now: float) -> None:
        reg, wid = env.register, env.worker_id
        kind, why = "refused", refusal(wid, reg, self.auth_token)
        if not why:
            kind, why = self._plane.classify(inb.routing_id, inb.key, wid, reg.incarnation)
        if kind == "refused":
            log.warning("worker %r refused: %s", wid, why)
            self._plane.send_to(inb.routing_id, encode("scheduler", pb.Registered(reason=why)))
            return
        if kind in ("again", "moved"):  # the same process: acknowledge, keep its state
            self._workers[wid].last_seen = now
            if kind == "moved":
                self._plane.move(wid, inb.routing_id)
                step = self.core.workers[wid].in_flight
                if step is not None:
                    self._fail_step(wid, step.step_id, "worker reconnected: step lost", now)
        else:
            if kind == "restarted":  # its old pool is gone: its requests are recomputed
                self._remove(wid, now)
            spec = WorkerSpec(
                wid,
                num_blocks=reg.num_blocks,
                block_size=reg.block_size,
                token_budget=reg.token_budget or 512,
                max_model_len=reg.max_model_len or 4096,
            )
            self.core.add_worker(spec)
            self._plane.add(inb.routing_id, inb.key, wid, reg.incarnation, now)
            log.info("worker %s registered: %s on %s", wid, reg.model_id, reg.device)
        ok = pb.Registered(accepted=True, heartbeat_s=self.worker_timeout_s / 4)
        self._plane.send_to(inb.routing_id, encode("scheduler", ok))

    def _fail_step(self, wid: str, step_id: int, why: str, now: float) -> None:
        self._deliver(self.core.update(StepResult(step_id, wid, (), 0.0, why), now))

    def _reply(self, inb: Inbound, body, now: float) -> None:
        self._plane.reply(inb, encode("scheduler", body), now)

    # ---- events to callers -------------------------------------------------------------------

    def _deliver(self, events) -> None:
        for ev in events:
            handle = self._handles.get(ev.request_id)
            if handle is None:
                continue
            if isinstance(ev, FinishEvent):
                self._finish(handle, ev.reason)
                del self._handles[ev.request_id]
                self.core.release(ev.request_id)
            else:
                handle.receive(ev)

    def _finish(self, handle: RequestHandle, reason: str) -> None:
        with self._pending_lock:
            self._pending -= 1
        close_handle(handle, reason)
