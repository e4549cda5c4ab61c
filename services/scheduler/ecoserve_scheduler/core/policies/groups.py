"""EcoServe (c): time-synced groups.

Waiting requests are bucketed by predicted length (`Request.rl_bucket`); the best bucket is
admitted as a group of up to `group_size` (same predicted length -> they finish and free
together), and choosing among buckets costs O(buckets) whatever the queue length. A group stays
open across admissions within a step and closes at the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..queues import GroupedQueue
from ..request import Request


@dataclass(frozen=True)
class GroupsConfig:
    group_size: int = 16


class SyncedGroups(GroupedQueue):
    """A waiting queue (see queues.WaitQueue): per-bucket queues ordered by `key`; the first
    admitted request of a step opens its bucket for `group_size - 1` more."""

    def __init__(
        self, key: Callable[[Request], tuple[float, ...]], config: GroupsConfig | None = None
    ) -> None:
        super().__init__(key, lambda r: r.rl_bucket)
        self.config = config or GroupsConfig()

    def pop(self, r: Request, admitted: bool = True) -> None:
        starts_group = admitted and not self.is_open  # read before the pop
        super().pop(r, admitted)  # closes the open group when this was its last member
        if starts_group:
            self.open_group(r, self.config.group_size - 1)


__all__ = ["GroupsConfig", "SyncedGroups"]
