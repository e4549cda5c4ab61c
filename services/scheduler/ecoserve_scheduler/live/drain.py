"""Workers leaving on their own: drain, then shut down, losing nothing.

A worker that is about to go (its pod is replaced in a rolling update, scaled in, or its node
drained) sends `Drain` on the worker plane (`ecoserve-worker --drain-timeout-s`, on SIGTERM).
From then on:

- it admits nothing new (`SchedulerCore.drain_worker`: the core's admission skips it and the
  placement no longer counts it as room, so the others do not hold a request back waiting for
  a worker that will never take it);
- what already runs there keeps being scheduled on it, step by step, until it finishes (a
  request preempted there meanwhile waits in the queue and runs elsewhere, as any victim);
- once nothing runs there and no step is out, `LiveEngine` removes it from the core (nothing
  to recompute) and sends it `Shutdown`, and the worker exits 0.

Which workers are leaving is the service's knowledge, learnt from a frame; the core only
stops admitting to them. A worker that never finishes draining (its own deadline passes, or
it dies) goes silent and is dropped as any silent worker, its requests recomputed elsewhere:
slower, never lost.
"""

from __future__ import annotations

from ..core import SchedulerCore


class Drains:
    """Which workers are draining, and which of them are done. Owned by the engine loop."""

    def __init__(self, core: SchedulerCore) -> None:
        self.core = core
        self.draining: dict[str, float] = {}  # worker id -> when its Drain arrived
        self.drained = 0  # workers that left by draining (none of their requests recomputed)

    def start(self, worker_id: str, now: float) -> bool:
        """`worker_id` asked to leave; False if it already had (a repeated Drain)."""
        if worker_id in self.draining:
            return False
        self.draining[worker_id] = now
        self.core.drain_worker(worker_id)
        return True

    def forget(self, worker_id: str) -> None:
        """The worker is gone some other way (dropped, restarted): nothing left to drain."""
        self.draining.pop(worker_id, None)

    def left(self, worker_id: str) -> None:
        """The worker finished draining and is being shut down."""
        self.forget(worker_id)
        self.drained += 1

    def done(self) -> list[str]:
        """Draining workers with nothing running and no step out: ready to shut down."""
        out = []
        for wid in self.draining:
            w = self.core.workers.get(wid)
            if w is not None and w.in_flight is None and not w.running:
                out.append(wid)
        return out

    def running(self) -> dict[str, int]:
        """Requests still running on each draining worker (what /stats shows)."""
        return {
            wid: len(self.core.workers[wid].running)
            for wid in self.draining
            if wid in self.core.workers
        }
