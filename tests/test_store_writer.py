"""The batched store writer: callers only queue, one thread writes; nothing is lost.

Runs against SQLite and PostgreSQL through test_store's `store` fixture (PostgreSQL is skipped
when it is not reachable). Tests synchronise with flush() / close(), never with sleeps.
"""

from __future__ import annotations

import logging
import threading

import pytest
import test_store
from sqlalchemy import exc, func, select

from ecoserve_scheduler.store import RequestStore, ServedRequest
from ecoserve_scheduler.store_writer import StoreWriter

store = test_store.store  # the fixture: a RequestStore on SQLite, and on PostgreSQL when up


@pytest.fixture
def writer(store):
    w = StoreWriter(store)
    w.start()
    yield w
    assert w.close()


def row_count(store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(ServedRequest)).scalar_one()


LOGGER = "ecoserve_scheduler.store_writer"


def logged(caplog):
    """The writer's own records (psycopg may log its own warnings about the same error)."""
    return [r for r in caplog.records if r.name == LOGGER]


def add(w, rid, prompt="p"):
    w.add(rid, prompt, 3, 64, arrival_s=1.0, model_id="m", predicted_tokens=7)


class Recording(RequestStore):
    """Keeps what each write_batch call was given; fails the first `fail_first` calls with
    `error` (a transient OperationalError unless told otherwise)."""

    def __init__(self, engine, fail_first=0, error=None):
        super().__init__(engine)
        self.calls: list[tuple[list, dict]] = []
        self.fail_first = fail_first
        self.error = error or exc.OperationalError("UPDATE ...", {}, Exception("db is locked"))

    def write_batch(self, rows, updates):
        self.calls.append(([dict(r) for r in rows], {k: dict(v) for k, v in updates.items()}))
        if len(self.calls) <= self.fail_first:
            raise self.error
        super().write_batch(rows, updates)


def test_verbs_only_queue_until_the_thread_writes(store):
    w = StoreWriter(store)
    for i in range(300):
        add(w, f"r{i}")
    w.mark_running("r0")
    assert store.get("r0") is None and row_count(store) == 0  # nothing touched the database
    assert w.queued == 301 and w.written == 0
    before = {t.ident for t in threading.enumerate()}
    w.start()
    w.start()  # once
    started = [t for t in threading.enumerate() if t.ident not in before]
    assert [(t.name, t.daemon) for t in started] == [("store-writer", True)]
    assert w.flush()
    assert row_count(store) == 300 and w.queued == 0
    assert (w.written, w.failed, w.batches, w.retries) == (301, 0, 2, 0)  # 256 + 45 items
    row = w.get("r0")
    assert (row.status, row.prompt_tokens, row.max_tokens, row.predicted_tokens) == (
        "running",
        3,
        64,
        7,
    )
    assert w.close()


def test_adds_from_eight_threads_are_batched(writer, store):
    def burst(t):
        for i in range(50):
            add(writer, f"t{t}-{i}")

    threads = [threading.Thread(target=burst, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert writer.flush()
    assert row_count(store) == 400 and writer.written == 400 and writer.failed == 0
    assert 1 <= writer.batches < 400


def test_read_your_writes(writer):
    add(writer, "r1")
    assert writer.get("r1").status == "queued"
    writer.mark_running("r1")
    assert writer.get("r1").status == "running"
    writer.finish("r1", response_tokens=41, finished_s=12.5)
    row = writer.get("r1")
    assert (row.status, row.response_tokens, row.finished_s) == ("finished", 41, 12.5)
    assert writer.get("nope") is None
    assert writer.finished_pairs() == [("p", 41)]


def test_updates_of_one_request_collapse_in_a_batch(store):
    rec = Recording(store.engine)
    w = StoreWriter(rec)
    add(w, "new")  # add and its updates in one batch: one insert of the final state
    w.mark_running("new")
    w.finish("new", 9, finished_s=5.0)
    w.start()
    assert w.flush() and len(rec.calls) == 1
    [inserted], updates = rec.calls[0]
    assert updates == {}
    assert (inserted["status"], inserted["response_tokens"], inserted["finished_s"]) == (
        "finished",
        9,
        5.0,
    )
    w.close()

    store.add("old", "p", 3, 64, arrival_s=1.0)  # a row written before this writer
    w = StoreWriter(rec)  # its updates in one batch: one update with the final values
    w.mark_running("old")
    w.fail("old", "worker died", finished_s=6.0)
    w.start()
    assert w.flush()
    assert rec.calls[-1] == (
        [],
        {"old": {"status": "failed", "fail_reason": "worker died", "finished_s": 6.0}},
    )
    assert (w.written, w.batches) == (2, 1)
    row = w.get("old")
    assert (row.status, row.fail_reason, row.finished_s) == ("failed", "worker died", 6.0)
    w.close()


def test_terminal_state_is_never_resurrected(store):
    w = StoreWriter(store)
    add(w, "same-batch")
    w.finish("same-batch", 4, finished_s=2.0)
    w.mark_running("same-batch")  # late, in the same batch
    w.abort("same-batch", finished_s=3.0)  # a second terminal state does not win either
    w.start()
    row = w.get("same-batch")
    assert (row.status, row.response_tokens, row.finished_s) == ("finished", 4, 2.0)

    add(w, "across")
    w.fail("across", "oom", finished_s=2.0)
    assert w.flush()
    w.mark_running("across")  # late, in a later batch
    w.finish("across", 5, finished_s=9.0)
    row = w.get("across")
    assert (row.status, row.fail_reason, row.response_tokens, row.finished_s) == (
        "failed",
        "oom",
        None,
        2.0,
    )
    assert w.failed == 0 and w.close()


def test_duplicate_add_raises_at_once(writer):
    add(writer, "r1")
    with pytest.raises(ValueError, match="r1"):
        add(writer, "r1")  # still queued
    assert writer.flush()
    with pytest.raises(ValueError, match="r1"):
        add(writer, "r1")  # written
    assert writer.written == 1 and writer.get("r1").prompt == "p"


def test_an_ended_request_is_forgotten_and_its_id_refused_at_write_time(writer, caplog):
    """Memory stays bounded by the live requests: once its end is written the writer forgets
    an id; reusing it is refused by the database, counted and logged, and the row stays."""
    add(writer, "r1")
    writer.finish("r1", 5, finished_s=1.0)
    assert writer.flush() and writer._ids == set()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        add(writer, "r1", prompt="again")  # no longer live: accepted, refused on write
        writer.fail("r1", "late", finished_s=2.0)
        assert writer.flush()
    assert (writer.written, writer.failed) == (2, 2) and writer._rejected == set()
    row = writer.get("r1")
    assert (row.prompt, row.status, row.response_tokens) == ("p", "finished", 5)


def test_update_of_unknown_id_loses_nothing_else(store, caplog):
    w = StoreWriter(store)
    add(w, "a")
    w.mark_running("ghost")
    add(w, "b")
    w.finish("a", 3, finished_s=1.0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert w.close()
    assert (w.written, w.failed, w.batches) == (3, 1, 1)
    assert store.get("a").status == "finished" and store.get("b").status == "queued"
    assert store.get("ghost") is None
    [record] = logged(caplog)
    assert "ghost" in record.getMessage() and "KeyError" in record.getMessage()


def test_id_from_an_earlier_run_loses_nothing_else(store, caplog):
    earlier = StoreWriter(store)
    add(earlier, "old", prompt="the earlier run's prompt")
    assert earlier.close()
    w = StoreWriter(store)
    add(w, "a")
    add(w, "old", prompt="secret new prompt")  # unknown to this writer: fails at write time
    add(w, "b")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        w.start()
        assert w.flush()
        assert (w.written, w.failed) == (2, 1)
        w.finish("old", 8, finished_s=3.0)  # must not land on the earlier run's row
        assert w.close()
    assert (w.written, w.failed) == (2, 2)
    assert store.get("a").status == "queued" and store.get("b").status == "queued"
    old = store.get("old")
    assert (old.prompt, old.status) == ("the earlier run's prompt", "queued")
    messages = [r.getMessage() for r in logged(caplog)]
    assert len(messages) == 2 and all("'old'" in m for m in messages)
    assert not any("INSERT" in m or "secret" in m for m in messages)  # no SQL, no prompts


def test_transient_failures_are_retried(store):
    rec = Recording(store.engine, fail_first=2)
    slept: list[float] = []
    w = StoreWriter(rec, retry_backoff_s=0.5, sleep=slept.append)
    add(w, "r1")
    add(w, "r2")
    w.start()
    assert w.flush()
    assert (w.written, w.failed, w.retries, w.batches) == (2, 0, 2, 1)
    assert slept == [0.5, 1.0] and len(rec.calls) == 3
    assert w.get("r2").status == "queued"
    w.close()


def test_a_database_that_stays_down_is_counted_and_logged(store, caplog):
    rec = Recording(store.engine, fail_first=10**9)
    w = StoreWriter(rec, max_retries=2, sleep=lambda s: None)
    add(w, "r1")
    add(w, "r2")
    w.mark_running("r1")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert w.close()
    # The batch (1 + 2 retries), then each request once on its own; all three items counted.
    assert (w.written, w.failed, w.retries, len(rec.calls)) == (0, 3, 2, 5)
    records = logged(caplog)
    assert len(records) == 2 and "db is locked" in records[0].getMessage()
    assert not any("UPDATE" in r.getMessage() for r in records)  # the SQL text stays out
    assert row_count(store) == 0


def test_close_writes_everything_and_is_final(store):
    w = StoreWriter(store, flush_interval_s=60.0)  # close must not wait out the interval
    w.start()
    for i in range(100):
        add(w, f"r{i}")
        w.abort(f"r{i}", finished_s=float(i))
    assert w.close(timeout=30.0)
    assert w.close()  # idempotent
    assert row_count(store) == 100 and (w.written, w.failed, w.queued) == (200, 0, 0)
    assert store.get("r99").status == "aborted"
    with pytest.raises(RuntimeError, match="closed"):
        add(w, "late")

    never_started = StoreWriter(store)
    add(never_started, "x")
    assert never_started.close() and store.get("x") is not None


def test_get_times_out_when_nothing_writes(store):
    w = StoreWriter(store)  # never started
    add(w, "r1")
    assert not w.flush(timeout=0.01)
    with pytest.raises(TimeoutError):
        w.get("r1", timeout=0.01)
    assert w.close() and w.get("r1") is not None


def test_write_batch_is_one_transaction(store):
    def row(rid):
        return {
            "request_id": rid,
            "prompt": "p",
            "prompt_tokens": 1,
            "max_tokens": 8,
            "arrival_s": 0,
        }

    store.write_batch([row("a")], {})
    with pytest.raises(KeyError, match="ghost"):
        store.write_batch([row("b")], {"a": {"status": "running"}, "ghost": {"status": "running"}})
    assert store.get("b") is None and store.get("a").status == "queued"  # all or nothing
    store.write_batch([], {"a": {"status": "aborted", "finished_s": 1.0}})
    store.write_batch([], {"a": {"status": "running"}})  # terminal: left as it is
    assert store.get("a").status == "aborted"


def test_burst_of_requests_from_sixteen_threads(writer, store):
    """500 requests, each add + mark_running + finish, from 16 threads at once; every row ends
    finished, with a read-your-writes check along the way."""
    errors: list[BaseException] = []

    def serve(t):
        try:
            for i in range(t, 500, 16):
                rid = f"req-{i}"
                add(writer, rid)
                writer.mark_running(rid)
                writer.finish(rid, i, finished_s=float(i))
                if i % 50 == 0:
                    assert writer.get(rid).status == "finished"
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert writer.close()
    assert (writer.written, writer.failed, writer.queued) == (1500, 0, 0)
    with store.engine.connect() as conn:
        statuses = conn.execute(
            select(ServedRequest.status, func.count()).group_by(ServedRequest.status)
        ).all()
    assert statuses == [("finished", 500)]
    assert len(writer.finished_pairs()) == 500
