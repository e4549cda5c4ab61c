"""The pure scheduler core: no I/O, no clock, no torch/zmq/grpc/sqlalchemy (a test enforces it)."""

from ecoserve_common.plan import BatchPlan, BatchShape, ScheduledSeq, StepResult

from .events import FinishEvent, PreemptEvent, TokenEvent
from .ledger import KVLedger, LedgerError
from .placement import DEFAULT_PLACEMENT, PLACEMENTS, Placement, make_placement
from .policies import POLICIES, make_policy, policy_from_spec
from .request import SLO, Request, SamplingParams, Status
from .scheduler import SchedulerCore
from .state import ScheduleOutput, WorkerSpec

__all__ = [
    "DEFAULT_PLACEMENT",
    "PLACEMENTS",
    "Placement",
    "make_placement",
    "POLICIES",
    "SLO",
    "BatchPlan",
    "BatchShape",
    "FinishEvent",
    "KVLedger",
    "LedgerError",
    "PreemptEvent",
    "Request",
    "SamplingParams",
    "ScheduledSeq",
    "ScheduleOutput",
    "SchedulerCore",
    "Status",
    "StepResult",
    "TokenEvent",
    "WorkerSpec",
    "make_policy",
    "policy_from_spec",
]
