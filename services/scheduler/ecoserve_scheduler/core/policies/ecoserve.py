"""EcoServe: a composition of four components, each a small module with its own config.

* (a) reservation.py  exact reservation of the padded predicted length, overcommitted for
                      first tokens with a TTFT target when the cache is full (`Admission`)
* (b) lending.py      KVC pipelining: lend unused reservation tails       (`Lending`)
* (c) slack.py        SLO-slack ordering with a late queue; slack victims (`QueueOrder`, `Victims`)
* (d) guard.py        the SLO guard on prefill budget and admissions      (`StepBudget`)

SyncDecoupled scheduling itself (all admitted generation tasks first, then prompt chunks in the
rest of the token budget, whose admission needs their whole reservation to fit) is the core's
iteration. An ablation is a different composition: `compose(lending=None)`, or through the
registry `make_policy("ecoserve", pipelining=False)`, which leaves the component out.
"""

from __future__ import annotations

from dataclasses import fields

from ..queues import FifoQueue, Key, KeyedQueue, WaitQueue
from .base import FullBudget, Lending, NoLending, Policy, QueueOrder, StepBudget
from .guard import GuardConfig, SloGuard
from .lending import KVLending, LendingConfig
from .reservation import PaddedReservation, ReservationConfig
from .slack import ArrivalOrder, Slack, SlackConfig, SlackOrder, SlackVictim

LENDING, GUARD = LendingConfig(), GuardConfig()  # the defaults (frozen)


def compose(
    reservation: ReservationConfig | None = None,
    slack: SlackConfig | None = None,
    lending: LendingConfig | None = LENDING,
    ordering: bool = True,
    guard: GuardConfig | None = GUARD,
    oracle_rl: bool = False,
    name: str = "ecoserve",
) -> Policy:
    """EcoServe from its components; None leaves a component out (`ordering=False`: arrival
    order instead of slack order; victims are still chosen by slack)."""
    rsv = PaddedReservation(reservation)
    slk = Slack(slack)

    def make_queue(key: Key) -> WaitQueue:
        return KeyedQueue(key) if ordering else FifoQueue()

    queue: QueueOrder
    if ordering:
        queue = SlackOrder(slk, make_queue)
    else:
        queue = ArrivalOrder(make_queue(lambda r: (r.arrival_s, 0)))
    lend: Lending = NoLending() if lending is None else KVLending(lending, rsv.padded_rl)
    budget: StepBudget = FullBudget() if guard is None else SloGuard(guard)
    return Policy(name, queue, rsv, budget, SlackVictim(slk), lend, wants_oracle_rl=oracle_rl)


_CONFIGS = (ReservationConfig, SlackConfig, LendingConfig, GuardConfig)
_KNOBS = {f.name: cls for cls in _CONFIGS for f in fields(cls)}


def ecoserve_policy(
    pipelining: bool = True,
    ordering: bool = True,
    oracle_rl: bool = False,
    slo_guard: bool = True,
    **knobs: float,
) -> Policy:
    """The registry's "ecoserve": component switches and the components' config fields as flat
    keyword arguments (pad_weight=..., guard_every=..., ...), mapped onto `compose`."""
    per: dict[type, dict[str, float]] = {cls: {} for cls in _CONFIGS}
    for k, v in knobs.items():
        if k not in _KNOBS:
            raise TypeError(f"ecoserve_policy() got an unexpected keyword argument {k!r}")
        per[_KNOBS[k]][k] = v
    return compose(
        reservation=ReservationConfig(**per[ReservationConfig]),  # type: ignore[arg-type]
        slack=SlackConfig(**per[SlackConfig]),
        lending=LendingConfig(**per[LendingConfig]) if pipelining else None,  # type: ignore[arg-type]
        ordering=ordering,
        guard=GuardConfig(**per[GuardConfig]) if slo_guard else None,  # type: ignore[arg-type]
        oracle_rl=oracle_rl,
    )


__all__ = ["compose", "ecoserve_policy"]
