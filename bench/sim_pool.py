"""bench/sim.py's process pool (or inline runner) and progress display."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any


class _Runner:
    """Submit keyed tasks, take results as they finish; jobs == 1 runs them inline, in order."""

    def __init__(self, jobs: int, on_submit: Callable[[], None]):
        self._pool = ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else None
        self._futures: dict[Future, Any] = {}
        self._inline: deque = deque()
        self._on_submit = on_submit

    def submit(self, key, fn, *args) -> None:
        self._on_submit()
        if self._pool is None:
            self._inline.append((key, fn, args))
        else:
            self._futures[self._pool.submit(fn, *args)] = key

    def __bool__(self) -> bool:
        return bool(self._futures or self._inline)

    def next(self):
        if self._pool is None:
            key, fn, args = self._inline.popleft()
            return key, fn(*args)
        done, _ = wait(self._futures, return_when=FIRST_COMPLETED)
        fut = next(iter(done))
        return self._futures.pop(fut), fut.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """A rich bar on stderr; one line per finished task when stderr is not a terminal."""

    def __init__(self, enabled: bool):
        self._bar = None
        self._console = None
        self._total = self._done = 0
        self._t0 = time.perf_counter()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._console = Console(stderr=True)
        if self._console.is_terminal:
            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self._console,
            )
            self._task = self._bar.add_task("bench-sim", total=0)
            self._bar.start()

    def add(self) -> None:
        self._total += 1
        if self._bar is not None:
            self._bar.update(self._task, total=self._total)

    def done(self, what: str) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=what)
        elif self._console is not None:
            dt = time.perf_counter() - self._t0
            print(f"[{self._done}/{self._total} {dt:6.1f}s] {what}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
