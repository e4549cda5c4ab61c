"""Plain state records of the core: a worker's spec and state, the counters, schedule's output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ecoserve_common.plan import BatchPlan

from .events import Event
from .iter_model import IterTimeModel
from .ledger import KVLedger
from .request import Request


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    num_blocks: int
    block_size: int = 16
    token_budget: int = 512
    max_num_seqs: int = 256
    max_model_len: int = 4096


@dataclass
class WorkerState:
    spec: WorkerSpec
    ledger: KVLedger
    running: dict[str, Request] = field(default_factory=dict)  # admission order
    decoding: dict[str, Request] = field(default_factory=dict)  # of running: prefill done
    in_flight: BatchPlan | None = None
    in_flight_reqs: list[Request] = field(default_factory=list)  # aligned with its decodes
    sent_s: float = 0.0
    iter_model: IterTimeModel = field(default_factory=IterTimeModel)
    draining: bool = False  # leaving: admits nothing, finishes what runs here (`drain_worker`)


@dataclass
class Counters:
    admitted: int = 0
    finished: int = 0
    failed: int = 0
    aborted: int = 0
    preemptions: int = 0
    extensions: int = 0
    loans: int = 0
    overcommits: int = 0  # admissions on demand beyond the reservations (EcoServe)
    guest_moves: int = 0
    guest_preemptions: int = 0
    steps: int = 0
    step_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class ScheduleOutput(NamedTuple):
    """What `SchedulerCore.schedule` returns: the plan (None: nothing to run) and the events
    raised while building it (preemptions, failures), oldest first."""

    plan: BatchPlan | None
    events: list[Event]


__all__ = ["Counters", "ScheduleOutput", "WorkerSpec", "WorkerState"]
