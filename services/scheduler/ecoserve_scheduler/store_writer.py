"""A batched, single-writer front for `RequestStore`: store writes leave the request hot path.

Request threads wrote `RequestStore` one transaction per call, and SQLite answered "database is
locked" under bursts. `StoreWriter`'s write verbs only queue and return; one daemon thread
("store-writer") writes up to `max_batch` queued items per transaction (`write_batch`).

Invariants:
- Every accepted item ends written or given up, logged and counted; nothing is dropped
  silently: written + failed + queued == items accepted.
- Items apply in queue order; `flush()` and `get()` see every write queued before them.
- finished / failed / aborted are final: no later update (a late mark_running) changes them.
- An id is added once while its request is live: a second `add` raises ValueError at once.
  The writer forgets an id once its terminal state is written (memory stays bounded by the
  requests in flight), so an id reused after its request ended, or one from an earlier run
  (rare: ids are random uuids minted server-side unless the client gives one), fails at write
  time: that add and its later updates are logged and counted in `failed`; the old row stays.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import exc

from .store import TERMINAL, DuplicateRequest, RequestStore, ServedRequest

log = logging.getLogger(__name__)

_Item = tuple[str, dict[str, Any], bool]  # (request_id, column values, is it an add)


class _Pending:
    """What one batch does to one request: its insert if the add is in the batch, else its
    update; later updates are folded into it in queue order, none after a terminal state."""

    def __init__(self) -> None:
        self.row: dict[str, Any] | None = None
        self.update: dict[str, Any] = {}
        self.items = 0

    def status(self) -> str | None:
        return (self.row if self.row is not None else self.update).get("status")

    def fold(self, values: dict[str, Any], is_add: bool) -> None:
        self.items += 1
        target = self.row if self.row is not None else self.update
        if is_add:
            self.row, self.update = {**values, **self.update}, {}
        elif target.get("status") not in TERMINAL:
            target.update(values)


def _transient(e: BaseException) -> bool:
    """Worth retrying: the database was busy or unreachable, not the data wrong."""
    lost = isinstance(e, exc.DBAPIError) and e.connection_invalidated
    return lost or isinstance(e, (exc.OperationalError, exc.InterfaceError))


def _describe(e: BaseException) -> str:
    """The error without SQL text or parameters (prompts are user data)."""
    cause = e.orig if isinstance(e, exc.DBAPIError) else e
    return f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}"[:300]


class StoreWriter:
    """Queues `RequestStore` writes from any thread; one thread writes them in batches.

    Counters, kept by the writer thread: `written` items committed (an update made moot by a
    terminal state counts: it did what it should), `failed` items given up, `batches` taken off
    the queue, `retries` of a transaction after a transient error; `queued` items not yet done.
    """

    def __init__(
        self,
        store: RequestStore,
        max_batch: int = 256,
        flush_interval_s: float = 0.05,
        max_retries: int = 3,
        retry_backoff_s: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store, self.max_batch, self.flush_interval_s = store, max_batch, flush_interval_s
        self.max_retries, self.retry_backoff_s, self._sleep = max_retries, retry_backoff_s, sleep
        self.written = self.failed = self.batches = self.retries = 0
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._ids: set[str] = set()  # ids added and not yet written terminal
        self._rejected: set[str] = set()  # ids whose add the database refused (writer only)
        self._accepted = self._done = 0  # items in, items written or given up
        self._flushers, self._closing = 0, False  # callers in flush(), close() was called
        self._thread: threading.Thread | None = None

    def add(
        self,
        request_id: str,
        prompt: str,
        prompt_tokens: int,
        max_tokens: int,
        arrival_s: float,
        model_id: str = "",
        predicted_tokens: int | None = None,
    ) -> None:
        """Queue the insert of a queued request; a request_id this writer already accepted
        raises DuplicateRequest (a ValueError) here (one from an earlier run fails at write
        time, see above)."""
        row = {"request_id": request_id, "prompt": prompt, "prompt_tokens": prompt_tokens}
        row |= {"max_tokens": max_tokens, "arrival_s": arrival_s, "model_id": model_id}
        self._put(request_id, {**row, "predicted_tokens": predicted_tokens}, is_add=True)

    def mark_running(self, request_id: str) -> None:
        self._put(request_id, {"status": "running"})

    def finish(self, request_id: str, response_tokens: int, finished_s: float) -> None:
        values = {"status": "finished", "response_tokens": response_tokens}
        self._put(request_id, {**values, "finished_s": finished_s})

    def fail(self, request_id: str, reason: str, finished_s: float) -> None:
        self._put(request_id, {"status": "failed", "fail_reason": reason, "finished_s": finished_s})

    def abort(self, request_id: str, finished_s: float) -> None:
        self._put(request_id, {"status": "aborted", "finished_s": finished_s})

    def _put(self, request_id: str, values: dict[str, Any], is_add: bool = False) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("store writer is closed")
            if is_add:
                if request_id in self._ids:
                    raise DuplicateRequest(f"request_id {request_id!r} was already added")
                self._ids.add(request_id)
            self._queue.append((request_id, values, is_add))
            self._accepted += 1
            if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
                self._cond.notify_all()  # the writer waits for a first item or a full batch

    def stats(self) -> dict[str, int]:
        """The counters, for /stats and /metrics."""
        return {
            "written": self.written,
            "failed": self.failed,
            "batches": self.batches,
            "retries": self.retries,
            "queued": self.queued,
        }

    @property
    def queued(self) -> int:
        with self._cond:
            return self._accepted - self._done

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until every item queued before now is done; False if `timeout` passed first."""
        with self._cond:
            target = self._accepted
            self._flushers += 1  # the writer stops gathering and writes now
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._done >= target, timeout)
            finally:
                self._flushers -= 1

    def get(self, request_id: str, timeout: float | None = 5.0) -> ServedRequest | None:
        """The row as of every write queued before this call (TimeoutError past `timeout`)."""
        if not self.flush(timeout):
            raise TimeoutError(f"store writes not flushed within {timeout} s")
        return self.store.get(request_id)

    def finished_pairs(
        self, limit: int | None = None, model_id: str | None = None
    ) -> list[tuple[str, int]]:
        """As `RequestStore.finished_pairs`; what is still queued is not waited for."""
        return self.store.finished_pairs(limit=limit, model_id=model_id)

    def fail_unfinished(self, reason: str, finished_s: float) -> int:
        """As `RequestStore.fail_unfinished`: at start-up, for the rows a previous run left."""
        return self.store.fail_unfinished(reason, finished_s)

    def start(self) -> None:
        """Start the writer thread (once; a second call does nothing)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
                self._thread.start()

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop taking writes, write what is queued, stop the thread; False if `timeout` passed
        first. Idempotent; a writer never started starts its thread to write its queue."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.start()
        assert self._thread is not None
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return  # closing, and everything is written
                # Let a burst gather into one batch, unless it is full or someone waits.
                self._cond.wait_for(
                    lambda: len(self._queue) >= self.max_batch or self._flushers or self._closing,
                    self.flush_interval_s,
                )
                n = min(len(self._queue), self.max_batch)
                batch = [self._queue.popleft() for _ in range(n)]
            before = self.written + self.failed
            try:
                self._write(batch)
            except Exception:  # a bug here must not kill the thread or lose the count
                log.exception("store writer: batch of %d items failed", len(batch))
                self.failed += len(batch) - (self.written + self.failed - before)
            finally:
                with self._cond:
                    self._done += len(batch)
                    self._cond.notify_all()

    def _write(self, batch: list[_Item]) -> None:
        """One transaction for the batch (retried if transient); if it fails, one per request."""
        self.batches += 1
        plan: dict[str, _Pending] = {}
        for request_id, values, is_add in batch:
            if request_id in self._rejected and not is_add:  # it would update an old row
                self.failed += 1
                log.warning("store update of request %r dropped: its add was refused", request_id)
                if values.get("status") in TERMINAL:  # its last write: forget the id
                    self._rejected.discard(request_id)
                    with self._cond:
                        self._ids.discard(request_id)
            else:
                plan.setdefault(request_id, _Pending()).fold(values, is_add)
        if self._commit(plan, self.max_retries) is None:
            self._forget(plan)
            return
        for request_id, pending in plan.items():  # one bad row must not take the others
            error = self._commit({request_id: pending}, retries=0)
            if error is not None:
                self._give_up(request_id, pending, error)
        self._forget(plan)

    def _forget(self, plan: dict[str, _Pending]) -> None:
        """Drop the ids whose request ended in this batch: nothing more is written for them."""
        ended = [rid for rid, p in plan.items() if p.status() in TERMINAL]
        self._rejected.difference_update(ended)
        with self._cond:
            self._ids.difference_update(ended)

    def _commit(self, plan: dict[str, _Pending], retries: int) -> Exception | None:
        """Write `plan` in one transaction, retrying transient errors; the error if it failed."""
        rows = [p.row for p in plan.values() if p.row is not None]
        updates = {rid: p.update for rid, p in plan.items() if p.row is None}
        for attempt in range(retries + 1):
            try:
                self.store.write_batch(rows, updates)
                self.written += sum(p.items for p in plan.values())
                return None
            except Exception as e:
                if not _transient(e) or attempt == retries:
                    return e
                self.retries += 1
                self._sleep(self.retry_backoff_s * 2**attempt)
        return None

    def _give_up(self, request_id: str, pending: _Pending, e: Exception) -> None:
        if pending.row is not None:
            self._rejected.add(request_id)  # later updates must not land on an older row
        self.failed += pending.items
        why = _describe(e)
        log.warning("store write of %r dropped (%d items): %s", request_id, pending.items, why)
