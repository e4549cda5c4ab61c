"""Waiting queues. Each policy picks one; all share peek/pop/push and lazy removal.

Removal is lazy (a done request is skipped when it reaches the head), so abort is O(1) and
peek/pop stay O(log n) however many requests wait: the per-iteration cost of admission does not
grow with the queue length.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Hashable
from typing import Protocol

from .request import Request, Status

Key = Callable[[Request], tuple[float, ...]]


class WaitQueue(Protocol):
    """What the policies' queue orders build on."""

    def push(self, r: Request, now: float) -> None: ...
    def requeue(self, r: Request, now: float) -> None:
        """A preempted request waits again (a FIFO puts it in front; a keyed queue by key)."""

    def peek(self, now: float) -> Request | None: ...
    def pop(self, r: Request, admitted: bool = True) -> None: ...
    def begin_step(self) -> None: ...


def _live(r: Request) -> bool:
    return r.status is Status.WAITING


class FifoQueue:
    """First come, first served; preempted requests go back to the front (as vLLM does)."""

    def __init__(self) -> None:
        self._q: deque[Request] = deque()

    def push(self, r: Request, now: float) -> None:
        self._q.append(r)

    def requeue(self, r: Request, now: float) -> None:
        self._q.appendleft(r)

    def peek(self, now: float) -> Request | None:
        while self._q and not _live(self._q[0]):
            self._q.popleft()
        return self._q[0] if self._q else None

    def pop(self, r: Request, admitted: bool = True) -> None:
        assert self._q and self._q[0] is r
        self._q.popleft()

    def begin_step(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self._q)


class KeyedQueue:
    """Smallest key first. Keys must not change while a request waits (they are taken at push)."""

    def __init__(self, key: Key) -> None:
        self._key = key
        self._heap: list[tuple[tuple[float, ...], int, Request]] = []
        self._seq = itertools.count()

    def push(self, r: Request, now: float) -> None:
        heapq.heappush(self._heap, (self._key(r), next(self._seq), r))

    requeue = push

    def peek(self, now: float) -> Request | None:
        while self._heap and not _live(self._heap[0][2]):
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    def pop(self, r: Request, admitted: bool = True) -> None:
        assert self._heap and self._heap[0][2] is r
        heapq.heappop(self._heap)

    def begin_step(self) -> None:
        pass

    def head_key(self) -> tuple[float, ...] | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)


class GroupedQueue:
    """One KeyedQueue per group (e.g. predicted-RL bucket). `peek` returns the best head over
    all groups, except while a group is `open`: then it keeps returning that group's members so
    that same-bucket requests are admitted together (time-synced groups). Cost per peek is
    O(number of groups), independent of how many requests wait."""

    def __init__(self, key: Key, group: Callable[[Request], Hashable]) -> None:
        self._key = key
        self._group = group
        self._groups: dict[Hashable, KeyedQueue] = {}
        self._open: Hashable | None = None
        self._open_left = 0

    def push(self, r: Request, now: float) -> None:
        g = self._group(r)
        q = self._groups.get(g)
        if q is None:
            q = self._groups[g] = KeyedQueue(self._key)
        q.push(r, now)

    requeue = push

    requeue = push

    def open_group(self, r: Request, size: int) -> None:
        """Keep admitting r's group for up to `size` more requests."""
        self._open, self._open_left = self._group(r), size

    def close_group(self) -> None:
        self._open, self._open_left = None, 0

    begin_step = close_group

    def peek(self, now: float) -> Request | None:
        if self._open is not None and self._open_left > 0:
            head = self._groups[self._open].peek(now)
            if head is not None:
                return head
        self.close_group()
        best: Request | None = None
        best_key: tuple[float, ...] | None = None
        for q in self._groups.values():
            head = q.peek(now)
            if head is None:
                continue
            key = q.head_key()
            if best_key is None or (key is not None and key < best_key):
                best, best_key = head, key
        return best

    def pop(self, r: Request, admitted: bool = True) -> None:
        self._groups[self._group(r)].pop(r)
        if admitted and self._open is not None:
            self._open_left -= 1

    @property
    def is_open(self) -> bool:
        return self._open is not None and self._open_left > 0

    def __len__(self) -> int:
        return sum(len(q) for q in self._groups.values())
