"""The pure scheduler core: no I/O, no clock, no torch/zmq/grpc/sqlalchemy (a test enforces it)."""

from .buckets import DEFAULT_EDGES, bucket_of
from .core import SchedulerCore, WorkerSpec
from .ledger import KVLedger, LedgerError
from .placement import DEFAULT_PLACEMENT, PLACEMENTS, Placement, make_placement
from .plan import (
    BatchPlan,
    BatchShape,
    FinishEvent,
    PreemptEvent,
    ScheduledSeq,
    StepResult,
    TokenEvent,
)
from .policies import POLICIES, make_policy
from .request import SLO, Request, SamplingParams, Status

__all__ = [
    "DEFAULT_PLACEMENT",
    "PLACEMENTS",
    "Placement",
    "make_placement",
    "DEFAULT_EDGES",
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
    "SchedulerCore",
    "Status",
    "StepResult",
    "TokenEvent",
    "WorkerSpec",
    "bucket_of",
    "make_policy",
]
