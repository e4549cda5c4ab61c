"""The request store behaves the same on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import exc

from ecoserve_scheduler.store import Base, RequestStore, create_schema, make_engine

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError as e:
            pytest.skip(f"psycopg not installed: {e}")
        engine = make_engine(PG_URL, connect_args={"connect_timeout": 5})
        try:
            with engine.connect():
                pass
        except exc.DBAPIError as e:
            engine.dispose()
            pytest.skip(f"PostgreSQL not reachable on {engine.url.host}:{engine.url.port}: {e}")
        # The table lives in a shared database: start and end without it.
        Base.metadata.drop_all(engine)
    create_schema(engine)
    yield RequestStore(engine)
    if request.param == "postgresql":
        Base.metadata.drop_all(engine)
    engine.dispose()


def test_lifecycle(store):
    store.add("r1", "hello world", 2, 64, arrival_s=10.5, model_id="m", predicted_tokens=30)
    row = store.get("r1")
    assert (row.status, row.response_tokens, row.finished_s, row.fail_reason) == (
        "queued",
        None,
        None,
        None,
    )
    assert (row.prompt, row.prompt_tokens, row.max_tokens) == ("hello world", 2, 64)
    assert (row.arrival_s, row.model_id, row.predicted_tokens) == (10.5, "m", 30)

    store.mark_running("r1")
    assert store.get("r1").status == "running"

    store.finish("r1", response_tokens=41, finished_s=12.25)
    row = store.get("r1")
    assert (row.status, row.response_tokens, row.finished_s) == ("finished", 41, 12.25)
    assert row.predicted_tokens == 30 and row.arrival_s == 10.5


def test_defaults(store):
    store.add("r1", "p", 1, 8, arrival_s=0.0)
    row = store.get("r1")
    assert row.model_id == "" and row.predicted_tokens is None


def test_fail_records_reason(store):
    store.add("r1", "p", 1, 8, arrival_s=1.0)
    store.mark_running("r1")
    store.fail("r1", "worker died", finished_s=3.0)
    row = store.get("r1")
    assert (row.status, row.fail_reason, row.finished_s) == ("failed", "worker died", 3.0)
    assert row.response_tokens is None


def test_get_unknown_is_none(store):
    assert store.get("nope") is None


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.mark_running("nope"),
        lambda s: s.finish("nope", 1, 1.0),
        lambda s: s.fail("nope", "x", 1.0),
    ],
    ids=["mark_running", "finish", "fail"],
)
def test_unknown_id_raises_key_error(store, call):
    store.add("r1", "p", 1, 8, arrival_s=0.0)
    with pytest.raises(KeyError, match="nope"):
        call(store)
    assert store.get("nope") is None
    assert store.get("r1").status == "queued"


def _finished(store, rid, finished_s, model_id="m", tokens=None):
    store.add(rid, f"prompt {rid}", 3, 100, arrival_s=0.0, model_id=model_id)
    store.finish(rid, tokens if tokens is not None else int(finished_s), finished_s)


def test_finished_pairs_order_and_exclusions(store):
    # Inserted out of finished_s order: the result follows finished_s, not insertion.
    _finished(store, "c", 30.0)
    _finished(store, "a", 10.0)
    _finished(store, "b", 20.0)
    store.add("queued", "q", 1, 8, arrival_s=0.0, model_id="m")
    store.add("running", "r", 1, 8, arrival_s=0.0, model_id="m")
    store.mark_running("running")
    store.add("failed", "f", 1, 8, arrival_s=0.0, model_id="m")
    store.fail("failed", "oom", finished_s=25.0)

    assert store.finished_pairs() == [("prompt a", 10), ("prompt b", 20), ("prompt c", 30)]


def test_finished_pairs_limit_keeps_newest_oldest_first(store):
    for i, t in enumerate([5.0, 1.0, 4.0, 2.0, 3.0]):
        _finished(store, f"r{i}", t)
    assert store.finished_pairs(limit=2) == [("prompt r2", 4), ("prompt r0", 5)]
    assert store.finished_pairs(limit=10) == store.finished_pairs()
    assert len(store.finished_pairs()) == 5
    assert store.finished_pairs(limit=0) == []


def test_finished_pairs_model_filter(store):
    _finished(store, "a1", 1.0, model_id="a")
    _finished(store, "b1", 2.0, model_id="b")
    _finished(store, "a2", 3.0, model_id="a")
    _finished(store, "a3", 4.0, model_id="a")
    assert store.finished_pairs(model_id="a") == [
        ("prompt a1", 1),
        ("prompt a2", 3),
        ("prompt a3", 4),
    ]
    assert store.finished_pairs(model_id="b") == [("prompt b1", 2)]
    assert store.finished_pairs(model_id="c") == []
    assert store.finished_pairs(limit=2, model_id="a") == [("prompt a2", 3), ("prompt a3", 4)]


def test_duplicate_request_id_rejected(store):
    store.add("r1", "first", 1, 8, arrival_s=1.0, model_id="m", predicted_tokens=5)
    with pytest.raises(exc.IntegrityError):
        store.add("r1", "second", 2, 16, arrival_s=2.0, model_id="other")
    row = store.get("r1")
    assert (row.prompt, row.prompt_tokens, row.max_tokens) == ("first", 1, 8)
    assert (row.arrival_s, row.model_id, row.predicted_tokens, row.status) == (
        1.0,
        "m",
        5,
        "queued",
    )
    # The store is still usable after the failed insert.
    store.mark_running("r1")
    assert store.get("r1").status == "running"


def test_abort_and_fail_unfinished_after_a_restart(store):
    """A restarted scheduler fails what its predecessor left queued or running, so every
    accepted request ends finished, failed or aborted: none stays in limbo."""
    for rid in ("q", "r", "f", "a"):
        store.add(rid, "p", 1, 8, arrival_s=0.0)
    store.mark_running("r")
    store.finish("f", 3, finished_s=1.0)
    store.abort("a", finished_s=1.5)
    assert store.fail_unfinished("scheduler restarted", finished_s=9.0) == 2
    got = {rid: (store.get(rid).status, store.get(rid).fail_reason) for rid in "qrfa"}
    assert got == {
        "q": ("failed", "scheduler restarted"),
        "r": ("failed", "scheduler restarted"),
        "f": ("finished", None),
        "a": ("aborted", None),
    }
    assert store.fail_unfinished("again", finished_s=10.0) == 0


def test_schema_is_versioned_and_migrations_are_idempotent(store):
    from ecoserve_scheduler.store import SCHEMA_VERSION, SchemaVersion, schema_version

    engine = store.engine
    assert schema_version(engine) == SCHEMA_VERSION
    store.add("kept", "p", 1, 8, arrival_s=0.0)
    assert create_schema(engine) == SCHEMA_VERSION  # a restart: nothing redone, nothing lost
    assert store.get("kept") is not None
    with engine.begin() as conn:
        conn.execute(SchemaVersion.__table__.update().values(version=SCHEMA_VERSION + 1))
    with pytest.raises(RuntimeError, match="newer than this code"):
        create_schema(engine)
