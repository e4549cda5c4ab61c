"""Policy hooks: where scheduling systems differ. The iteration itself is in core/scheduler.py.

A `Policy` is a name plus five small hooks, each a `typing.Protocol`. Hooks get what they need
as arguments (the `Step` being built: the worker's ledger, its running requests, the time, the
measured iteration time) and hold no reference to the core:

* `QueueOrder`  order the waiting queue (push/requeue/peek/pop) and running prefills;
* `Admission`   tokens to reserve at admission and on growth, the KV headroom and reserve pool;
* `StepBudget`  chunking, the prefill token budget of a step, whether a new request fits it;
* `Victims`     whom to preempt when a request must grow;
* `Lending`     KV lending (KVCPipe): borrow a host's unused tail when fresh blocks are short.

A `Policy` may also set `prefill_first` (vLLM v0): prompts are admitted before any decode, and an
iteration that admits one runs prompts only.

This module also holds the baselines' hooks (vLLM-style defaults) that the small policy modules
(vllm, vllm_v0, sarathi, orca, sjf) compose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..ledger import KVLedger
from ..queues import FifoQueue, KeyedQueue, WaitQueue
from ..request import Request
from ..step import Step


class QueueOrder(Protocol):
    def push(self, r: Request, now: float, iter_s: float) -> None: ...
    def requeue(self, r: Request, now: float, iter_s: float) -> None:
        """r was preempted: it waits again."""

    def peek(self, now: float) -> Request | None: ...
    def pop(self, r: Request) -> None:
        """Remove r, the request `peek` returned, from the queue."""

    def on_done(self, r: Request) -> None:
        """r finished, failed or was aborted: drop any per-request state."""

    def begin_step(self) -> None: ...
    def prefill_order(self, step: Step, prefills: list[Request]) -> list[Request]: ...


class Admission(Protocol):
    @property
    def headroom_share(self) -> float:
        """Admissions leave this share of blocks free (vLLM's watermark)."""

    @property
    def reserve_share(self) -> float:
        """Share of blocks held back as a reserve pool."""

    @property
    def use_reserve(self) -> bool:
        """Growth may take the reserve pool."""

    @property
    def passes_victims(self) -> bool:
        """A preempted request at the queue head that does not fit yet lets the requests behind
        it try (they may overcommit, it may not); else it blocks the queue (vLLM's FCFS)."""

    def admission_tokens(self, r: Request, n: int) -> int:
        """Tokens to reserve when r is admitted with a first chunk of n."""

    def growth_tokens(self, r: Request, need: int) -> int:
        """Tokens r's table should cover when it must hold `need`."""

    def overcommits(self, step: Step, r: Request) -> bool:
        """Whether r, whose reservation neither fits nor borrows, may still join on demand
        (holding only what its first chunk needs, growing later like vLLM's)."""


class StepBudget(Protocol):
    @property
    def chunked(self) -> bool:
        """Chunked prefill within the token budget (else a prompt runs whole)."""

    def prefill_budget(self, step: Step) -> int:
        """Token budget left for prefill chunks once every decode is scheduled."""

    def admits(self, step: Step, r: Request) -> bool:
        """Whether waiting request r may join this step (before its KV is reserved)."""


class Victims(Protocol):
    def victim(self, step: Step, r: Request) -> Request | None:
        """Whom to preempt so r can grow (may be r itself: then r waits)."""


class Lending(Protocol):
    @property
    def collision_lookahead(self) -> int:
        """A guest moves away when its host comes within this many tokens of the loan."""

    def lend(self, step: Step, r: Request, blocks: int) -> bool:
        """Admit r into `blocks` borrowed blocks when fresh ones are short."""


# ---- the baselines' hooks -------------------------------------------------------------------


class FifoOrder:
    """First come, first served; a preempted request goes back to the front (as vLLM)."""

    def __init__(self) -> None:
        self.queue: WaitQueue = FifoQueue()

    def push(self, r: Request, now: float, iter_s: float) -> None:
        self.queue.push(r, now)

    def requeue(self, r: Request, now: float, iter_s: float) -> None:
        self.queue.requeue(r, now)

    def peek(self, now: float) -> Request | None:
        return self.queue.peek(now)

    def pop(self, r: Request) -> None:
        self.queue.pop(r)

    def on_done(self, r: Request) -> None:
        pass

    def begin_step(self) -> None:
        self.queue.begin_step()

    def prefill_order(self, step: Step, prefills: list[Request]) -> list[Request]:
        return prefills  # admission order


class KeyedOrder(FifoOrder):
    """Smallest key first (keys are taken at push)."""

    def __init__(self, key: Callable[[Request], tuple[float, ...]]) -> None:
        self.queue = KeyedQueue(key)


@dataclass(frozen=True)
class OnDemand:
    """KV allocated as tokens are written (vLLM's paging)."""

    headroom_share: float = 0.0
    reserve_share: float = 0.0
    use_reserve: bool = False
    passes_victims: bool = False

    def admission_tokens(self, r: Request, n: int) -> int:
        return r.num_computed + n

    def growth_tokens(self, r: Request, need: int) -> int:
        return need

    def overcommits(self, step: Step, r: Request) -> bool:
        return False  # admission_tokens is already what r needs (or the policy's fixed rule)


@dataclass(frozen=True)
class FullBudget:
    """The whole token budget; any request may join while it lasts."""

    chunked: bool = True

    def prefill_budget(self, step: Step) -> int:
        return step.budget

    def admits(self, step: Step, r: Request) -> bool:
        return True


class NewestVictim:
    """vLLM's: the most recently admitted running request (may be r itself)."""

    def victim(self, step: Step, r: Request) -> Request | None:
        return next(reversed(step.running.values()), None)


class NoLending:
    collision_lookahead = 0

    def lend(self, step: Step, r: Request, blocks: int) -> bool:
        return False


@dataclass
class Policy:
    """A scheduling policy: a name and its hooks (see the module docstring)."""

    name: str
    queue: QueueOrder = field(default_factory=FifoOrder)
    admission: Admission = field(default_factory=OnDemand)
    budget: StepBudget = field(default_factory=FullBudget)
    victims: Victims = field(default_factory=NewestVictim)
    lending: Lending = field(default_factory=NoLending)
    wants_oracle_rl: bool = False  # the simulator gives it exact response lengths
    # vLLM v0: admissions run before the decodes (within `budget.prefill_budget` of a step with
    # no decode yet), and a step that admits a prompt runs prompts only (core/admit.py).
    prefill_first: bool = False

    @property
    def chunked(self) -> bool:
        return self.budget.chunked

    @property
    def reserve_share(self) -> float:
        return self.admission.reserve_share

    def capacity_tokens(self, ledger: KVLedger) -> int:
        """Most tokens one sequence may ever hold on this ledger under this policy."""
        headroom = int(self.admission.headroom_share * ledger.num_blocks)
        return (ledger.num_blocks - ledger.reserve_blocks - headroom) * ledger.block_size


__all__ = [
    "Admission",
    "FifoOrder",
    "FullBudget",
    "KeyedOrder",
    "Lending",
    "NewestVictim",
    "NoLending",
    "OnDemand",
    "Policy",
    "QueueOrder",
    "StepBudget",
    "Victims",
]
