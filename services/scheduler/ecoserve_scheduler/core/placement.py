"""Placement: on which worker a waiting request's prompt task runs.

The core is pull-based: every worker with no step in flight calls `schedule`, and the policy
admits waiting requests into *that* worker. A placement decides, for the worker asking, whether
it should take the queue head now or leave it for a better worker (which will pull it at its
next step, one iteration later at most). Leaving it keeps head-of-line order: later requests do
not overtake a deferred head.

Placements (pick by name with `make_placement`; `SchedulerCore(policy, placement=...)`):

* `first-idle`: whichever worker schedules first takes the head (the behaviour before
  placement existed). Cheapest; piles work onto the lowest-numbered idle worker.
* `least-loaded` (default): a worker takes the head only if its load is within `tolerance` of the
  least-loaded worker that could take it (free KV for its tokens so far plus one, and a
  sequence slot). Load is

      KV held share  (blocks reserved, lent blocks included, / blocks a fresh admission may use)
    + sequence share (running requests / max_num_seqs)
    + prefill_weight x prompts still prefilling (queued prompt work ahead of the new one)

  Under EcoServe a reservation is prompt + padded predicted response length, so the KV share is
  also the predicted remaining work; under on-demand policies it is the KV already written.
  A head deferred for `patience_s` (virtual or wall time, as passed in) is taken by any worker,
  so a best worker that cannot admit it (SLO guard, full budget) never starves it.

Pure: no clock, no I/O. Cost: O(workers log workers) once per `schedule` call that reaches
admission (the other workers' loads are computed lazily and cached on the Step), and a short
scan of that sorted list per admission attempt.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .request import Request
from .state import WorkerState

if TYPE_CHECKING:
    from .step import Step


class Placement:
    name = "base"

    def admits(self, step: Step, r: Request) -> bool:
        """Whether the worker building `step` should admit waiting request `r` now."""
        raise NotImplementedError

    def on_done(self, request_id: str) -> None:
        """r left the queue (admitted, finished, failed, aborted): drop per-request state."""


class FirstIdle(Placement):
    name = "first-idle"

    def admits(self, step: Step, r: Request) -> bool:
        return True


def worker_load(w: WorkerState, prefill_weight: float) -> float:
    """Load score of a WorkerState (see the module docstring); lower is less loaded."""
    ledger = w.ledger
    usable = max(1, ledger.num_blocks - ledger.reserve_blocks)
    kv = 1.0 - ledger.num_free / usable
    running = len(w.running)
    prefilling = running - len(w.decoding)
    return kv + running / w.spec.max_num_seqs + prefill_weight * prefilling


def has_room(w: WorkerState) -> bool:
    """Whether w could take a new request (a draining worker never does)."""
    return not w.draining and w.ledger.num_free > 0 and len(w.running) < w.spec.max_num_seqs


class LeastLoaded(Placement):
    name = "least-loaded"

    def __init__(
        self, tolerance: float = 0.05, prefill_weight: float = 0.1, patience_s: float = 0.25
    ) -> None:
        self.tolerance = tolerance
        self.prefill_weight = prefill_weight
        self.patience_s = patience_s
        self._deferred_since: dict[str, float] = {}
        self.deferrals = 0  # how often a worker left the head for a better one

    def others(self, step: Step) -> list[tuple[float, int]]:
        """(load, free blocks) of the other workers with room, least loaded first; cached for
        this step (the others cannot change while this worker's step is being built)."""
        cached = step.placement_cache
        if cached is None:
            me, weight = step.w, self.prefill_weight
            cached = sorted(
                (worker_load(w, weight), w.ledger.num_free)
                for w in step.workers.values()
                if w is not me and has_room(w)
            )
            step.placement_cache = cached
        return cached

    def best_other(self, step: Step, r: Request) -> float:
        """Lowest load among the other workers whose free KV holds at least r's tokens so far
        plus one (a worker that cannot take r is no reason to leave it waiting)."""
        need = step.ledger.blocks_for(r.num_tokens + 1)
        return next((load for load, free in self.others(step) if free >= need), math.inf)

    def admits(self, step: Step, r: Request) -> bool:
        if len(step.workers) < 2:
            return True
        best = self.best_other(step, r)
        if best == math.inf or worker_load(step.w, self.prefill_weight) <= best + self.tolerance:
            self._deferred_since.pop(r.request_id, None)
            return True
        since = self._deferred_since.setdefault(r.request_id, step.now)
        if step.now - since >= self.patience_s:
            self._deferred_since.pop(r.request_id, None)
            return True
        self.deferrals += 1
        return False

    def on_done(self, request_id: str) -> None:
        self._deferred_since.pop(request_id, None)


PLACEMENTS: dict[str, type[Placement]] = {p.name: p for p in (FirstIdle, LeastLoaded)}
DEFAULT_PLACEMENT = "least-loaded"


def make_placement(name: str = DEFAULT_PLACEMENT, **options: float) -> Placement:
    try:
        cls = PLACEMENTS[name]
    except KeyError:
        known = ", ".join(sorted(PLACEMENTS))
        raise ValueError(f"unknown placement {name!r}; known: {known}") from None
    return cls(**options)


__all__ = ["DEFAULT_PLACEMENT", "PLACEMENTS", "Placement", "make_placement", "worker_load"]
