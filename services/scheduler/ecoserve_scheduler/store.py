"""The request store: one row per served request, written by the scheduler.

This module is the single definition of the `served_requests` schema. The scheduler writes it
through `RequestStore`; the response-length predictor's retraining reads `finished_pairs`.
It is I/O, so nothing under `ecoserve_scheduler/core/` may import it (the core stays pure).

SQLite (`make_engine`): WAL journal and a busy timeout on every connection, so a burst of
writers waits for the lock instead of failing with "database is locked" and readers never
block the writer; the database file is created (or tightened to) mode 0600, since rows hold
prompts (user data), and SQLite gives its -wal / -shm files the same mode.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Engine,
    Float,
    Index,
    Integer,
    String,
    Text,
    bindparam,
    create_engine,
    event,
    exc,
    insert,
    make_url,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 5000  # how long a SQLite writer waits for the lock before failing


class Base(DeclarativeBase):
    pass


# A row in one of these states is final: `write_batch` never changes it again.
TERMINAL = ("finished", "failed", "aborted")

# What `add` leaves unset; `write_batch` fills each inserted row up to these, so that every row
# of a batch has the same columns and the insert is one executemany.
_ROW_DEFAULTS: dict[str, Any] = {
    "model_id": "",
    "predicted_tokens": None,
    "status": "queued",
    "response_tokens": None,
    "fail_reason": None,
    "finished_s": None,
}


class ServedRequest(Base):
    """A request the scheduler served (or is serving), and how long its response turned out.

    request_id: the request's one id (minted at the API edge: the HTTP response id, the gRPC
        id, the log field); unique, so a replayed add fails loudly.
    prompt: the prompt text; the predictor's input feature when it retrains.
    prompt_tokens: prompt length in tokens, for the KV-cache and prefill cost of the request.
    response_tokens: tokens actually generated; the predictor's training target. None until
        the request finishes.
    max_tokens: the client's generation cap; the response never exceeds it.
    status: "queued" -> "running" -> "finished" | "failed" | "aborted".
    fail_reason: why a request failed; None otherwise.
    model_id: which model served it, so each model's predictor trains on its own rows.
    predicted_tokens: what the predictor said at admission, to measure its error later.
    arrival_s, finished_s: wall-clock Unix seconds (time.time()), for people and for joins
        with other logs; never the core's monotonic clock. finished_s is None while the
        request is queued or running.

    The predictor retrains only from rows with status "finished": only they have a true
    response length (a failed or aborted request stopped early). The (status, finished_s)
    index serves exactly that query.
    """

    __tablename__ = "served_requests"
    __table_args__ = (Index("ix_served_requests_status_finished_s", "status", "finished_s"),)

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    response_tokens: Mapped[int | None] = mapped_column(Integer)
    max_tokens: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    fail_reason: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[str] = mapped_column(String(128), default="")
    predicted_tokens: Mapped[int | None] = mapped_column(Integer)
    arrival_s: Mapped[float] = mapped_column(Float)
    finished_s: Mapped[float | None] = mapped_column(Float)


class DuplicateRequest(ValueError):
    """A request id already in the store (or already queued for it)."""


def is_duplicate(e: BaseException) -> bool:
    """Whether a store `add` failed because the request id is taken (not because the
    database failed): the only add failure a client is told about."""
    return isinstance(e, (DuplicateRequest, exc.IntegrityError))


def make_engine(url: str = "sqlite:///ecoserve.db", **kw: Any) -> Engine:
    """An engine for `url`; for SQLite: WAL, a busy timeout and a 0600 file (see above)."""
    if not url.startswith("sqlite"):
        return create_engine(with_driver(url), future=True, pool_pre_ping=True, **kw)
    # The scheduler may touch the store from more than one thread; each session still
    # uses one connection at a time.
    kw["connect_args"] = {"check_same_thread": False, **kw.get("connect_args", {})}
    _private_file(make_url(url).database)
    engine = create_engine(url, future=True, pool_pre_ping=True, **kw)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def with_driver(url: str) -> str:
    """A bare `postgresql://` (or libpq's `postgres://`) URL names psycopg 3, the driver the
    scheduler image installs: it is the form an operator's Secret holds (CloudNativePG's
    `<cluster>-app` key `uri`), and SQLAlchemy would otherwise pick psycopg2, which is absent."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url[len(bare) :]
    return url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")  # an in-memory database stays "memory"
        cur.execute("PRAGMA synchronous = NORMAL")  # WAL's usual pairing: durable at checkpoints
    finally:
        cur.close()


def _private_file(database: str | None) -> None:
    """Create the SQLite file with mode 0600, or take group and other access off an
    existing one (an in-memory or URI database is left alone)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    fd = os.open(database, os.O_CREAT | os.O_RDONLY, 0o600)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            try:
                os.fchmod(fd, 0o600)
                log.warning("request store %s had mode %o: set to 0600", database, mode)
            except OSError as e:  # not ours to change: say so, and go on
                log.warning("request store %s: mode %o left as it is (%s)", database, mode, e)
    finally:
        os.close(fd)


class SchemaVersion(Base):
    """One row: the migration the database is at (see MIGRATIONS)."""

    __tablename__ = "ecoserve_schema"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


def _v1_served_requests(conn) -> None:
    ServedRequest.__table__.create(conn, checkfirst=True)  # checkfirst: pre-versioning stores


# Ordered, append-only: a schema change is a new function here, never an edit of an old one.
MIGRATIONS = [(1, _v1_served_requests)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def schema_version(engine: Engine) -> int:
    """The version a database is at; 0 for an empty one."""
    with engine.connect() as conn:
        if not engine.dialect.has_table(conn, SchemaVersion.__tablename__):
            return 0
        return conn.execute(select(SchemaVersion.version)).scalar() or 0


def create_schema(engine: Engine) -> int:
    """Bring the database to SCHEMA_VERSION, one migration per transaction; returns it.
    A database newer than this code is refused rather than guessed at."""
    current = schema_version(engine)
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema is v{current}, newer than this code's v{SCHEMA_VERSION}: upgrade"
        )
    SchemaVersion.__table__.create(engine, checkfirst=True)
    for version, migrate in MIGRATIONS:
        if version <= current:
            continue
        with engine.begin() as conn:
            migrate(conn)
            conn.execute(SchemaVersion.__table__.delete())
            conn.execute(SchemaVersion.__table__.insert().values(id=1, version=version))
    return SCHEMA_VERSION


class RequestStore:
    """Reads and writes `served_requests`; every method is one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # expire_on_commit=False: rows returned by `get` stay readable after their session.
        self._session = sessionmaker(engine, expire_on_commit=False)

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
        """Insert a queued request; a duplicate request_id raises IntegrityError."""
        row = ServedRequest(
            request_id=request_id,
            prompt=prompt,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            arrival_s=arrival_s,
            model_id=model_id,
            predicted_tokens=predicted_tokens,
            status="queued",
        )
        with self._session.begin() as s:
            s.add(row)

    def mark_running(self, request_id: str) -> None:
        self._update(request_id, status="running")

    def finish(self, request_id: str, response_tokens: int, finished_s: float) -> None:
        self._update(
            request_id, status="finished", response_tokens=response_tokens, finished_s=finished_s
        )

    def fail(self, request_id: str, reason: str, finished_s: float) -> None:
        self._update(request_id, status="failed", fail_reason=reason, finished_s=finished_s)

    def abort(self, request_id: str, finished_s: float) -> None:
        self._update(request_id, status="aborted", finished_s=finished_s)

    def fail_unfinished(self, reason: str, finished_s: float) -> int:
        """Fail every queued or running row (a restarted scheduler lost their state); returns
        how many. After it, no accepted request is left in limbo."""
        with self._session.begin() as s:
            rows = s.scalars(
                select(ServedRequest).where(ServedRequest.status.in_(("queued", "running")))
            ).all()
            for row in rows:
                row.status, row.fail_reason, row.finished_s = "failed", reason, finished_s
            return len(rows)

    def get(self, request_id: str) -> ServedRequest | None:
        with self._session.begin() as s:
            return s.get(ServedRequest, request_id)

    def finished_pairs(
        self, limit: int | None = None, model_id: str | None = None
    ) -> list[tuple[str, int]]:
        """(prompt, response_tokens) of finished rows, oldest first by finished_s; rows stored
        without their prompt (`store_prompts` off) have nothing to train on and are left out.

        With `limit`, only the newest `limit` rows, still oldest first. request_id breaks
        finished_s ties so the order (and which rows a limit keeps) is deterministic.
        """
        q = select(ServedRequest.prompt, ServedRequest.response_tokens).where(
            ServedRequest.status == "finished", ServedRequest.prompt != ""
        )
        if model_id is not None:
            q = q.where(ServedRequest.model_id == model_id)
        newest_first = q.order_by(ServedRequest.finished_s.desc(), ServedRequest.request_id.desc())
        if limit is not None:
            newest_first = newest_first.limit(limit)
        with self._session.begin() as s:
            rows = s.execute(newest_first).all()
        return [(prompt, tokens) for prompt, tokens in reversed(rows)]

    def write_batch(
        self, rows: Sequence[Mapping[str, Any]], updates: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Insert `rows`, then apply `updates`, all in one transaction: all of it or none.

        rows: column -> value, as `add` would insert (request_id, prompt, prompt_tokens,
            max_tokens, arrival_s; the other columns default as in `add`, status "queued").
            A request_id already in the table raises IntegrityError.
        updates: request_id -> the columns to set (status and what goes with it). An id that
            is in neither the table nor `rows` raises KeyError. A row whose status is already
            terminal is left as it is: a late "running" never resurrects a finished request.

        The batched writer (store_writer.py) writes through this alone; the single-row methods
        above stay for callers that write one request at a time.
        """
        table = Base.metadata.tables[ServedRequest.__tablename__]
        with self._session.begin() as s:
            if rows:
                s.execute(insert(ServedRequest), [{**_ROW_DEFAULTS, **row} for row in rows])
            if not updates:
                return
            ids = list(updates)
            known = select(ServedRequest.request_id).where(ServedRequest.request_id.in_(ids))
            missing = set(ids) - set(s.scalars(known))
            if missing:
                # Raising inside begin() rolls the transaction back: nothing is written.
                raise KeyError(f"no served request with request_id {min(missing)!r}")
            # One executemany per set of columns (a handful: running, finished, failed, ...).
            by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for request_id, values in updates.items():
                params = {"rid": request_id, **{f"v_{k}": v for k, v in values.items()}}
                by_columns.setdefault(tuple(sorted(values)), []).append(params)
            for columns, batch in by_columns.items():
                stmt = (
                    table.update()
                    .where(table.c.request_id == bindparam("rid"))
                    .where(table.c.status.not_in(TERMINAL))
                    .values({c: bindparam(f"v_{c}") for c in columns})
                )
                s.execute(stmt, batch)

    def _update(self, request_id: str, **values: Any) -> None:
        """Set `values` on one row; a row already terminal is left as it is (as in
        `write_batch`): a late update never changes how a request ended."""
        with self._session.begin() as s:
            row = s.get(ServedRequest, request_id)
            if row is None:
                # Raising inside begin() rolls the transaction back: nothing is written.
                raise KeyError(f"no served request with request_id {request_id!r}")
            if row.status in TERMINAL:
                return
            for name, value in values.items():
                setattr(row, name, value)
