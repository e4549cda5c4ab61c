"""Waiting queues. Each policy picks one; all share peek/pop/push and lazy removal.

Removal is lazy (a done request is skipped when it reaches the head), so abort is O(1) and
peek/pop stay O(log n) however many requests wait: the per-iteration cost of admission does not
grow with the queue length.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
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

    def __len__(self) -> int:
        return len(self._heap)
