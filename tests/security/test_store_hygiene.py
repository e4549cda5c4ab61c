"""The request store under bursts, failures and clients that leave (issue "Hardening",
finding 7): SQLite in WAL mode with a busy timeout and a 0600 file; no SQL or driver text in
what a client reads; a store that fails never cuts a request; every row ends finished, failed
or aborted, a client that disconnects mid-stream included; prompts kept only when asked.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import exc, text
from test_edge_http import FakeEngine, make_frontend, raw_request, served, wait_for

from ecoserve_scheduler.live.frontend import GenerateParams
from ecoserve_scheduler.live.http_api import create_app
from ecoserve_scheduler.store import RequestStore, create_schema, make_engine
from ecoserve_scheduler.store_writer import StoreWriter


def sqlite_store(path) -> RequestStore:
    db = make_engine(f"sqlite:///{path}")
    create_schema(db)
    return RequestStore(db)


def test_sqlite_runs_in_wal_with_a_busy_timeout_in_a_private_file(tmp_path):
    store = sqlite_store(tmp_path / "new.db")
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
    assert stat.S_IMODE(os.stat(tmp_path / "new.db").st_mode) == 0o600
    old = tmp_path / "old.db"
    old.touch(mode=0o644)
    os.chmod(old, 0o644)
    sqlite_store(old)
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o600
    make_engine("sqlite://").dispose()  # in memory: nothing to create


def test_a_burst_of_single_row_writers_never_sees_database_is_locked(tmp_path):
    path = tmp_path / "burst.db"
    sqlite_store(path)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        store = sqlite_store(path)  # its own engine: the way two processes would share it
        try:
            for i in range(25):
                rid = f"w{k}-{i}"
                store.add(rid, "p", 1, 8, arrival_s=0.0)
                store.mark_running(rid)
                store.finish(rid, 1, 1.0)
        except BaseException as e:  # noqa: BLE001 - collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(sqlite_store(path).finished_pairs()) == 12 * 25


class BrokenStore:
    """A store whose every write fails as a locked database would."""

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self, *args, **kw):
        self.calls += 1
        raise exc.OperationalError("INSERT INTO served_requests ...", {}, Exception("locked"))

    add = mark_running = finish = fail = abort = _fail


def test_a_failing_store_never_cuts_a_request():
    store = BrokenStore()
    frontend = make_frontend(FakeEngine(), store=store)
    app = create_app(frontend, "tiny")
    with TestClient(app) as c:
        whole = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 3
        streamed = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": 1})
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        chunks = [json.loads(x[6:]) for x in streamed.text.split("\n") if x.startswith("data: {")]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == "EEE"
        stats = c.get("/stats").json()["frontend"]
        assert "ecoserve_store_errors 6.0" in c.get("/metrics").text
    assert stats["store_errors"] == store.calls == 6  # add, running, finish: twice
    handle, _ = frontend.start(GenerateParams(prompt="grpc path", request_id="g"))
    assert list(frontend.follow(handle))[-1] == ([], "length")


def test_a_client_that_disconnects_mid_stream_leaves_its_row_aborted(tmp_path):
    store = sqlite_store(tmp_path / "s.db")
    engine = FakeEngine(hold=True)
    app = create_app(make_frontend(engine, store=store), "tiny")
    with served(app) as base:
        port = int(base.rsplit(":", 1)[1])
        s = raw_request(port, {"prompt": "bye", "max_tokens": 50, "stream": True})
        wait_for(lambda: engine.pending == 1)
        (rid,) = engine.handles
        engine.tokens(rid, 2)
        s.settimeout(5)
        got = b""
        while b"data: " not in got:  # the stream is under way
            got += s.recv(65536)
        wait_for(lambda: store.get(rid).status == "running")
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        wait_for(lambda: store.get(rid).status == "aborted")
        assert rid in engine.cancelled and engine.pending == 0
        # fifty that leave while waiting (more than a thread pool would hold for them)
        socks = [raw_request(port, {"prompt": f"w{i}", "stream": True}) for i in range(50)]
        wait_for(lambda: engine.pending == 50)
        waiting = list(engine.handles)
        wait_for(lambda: all(store.get(r) is not None for r in waiting))
        for s in socks:
            s.close()
        wait_for(lambda: {store.get(r).status for r in waiting} == {"aborted"})
        assert engine.pending == 0
        # and one that leaves a non-streaming request
        s = raw_request(port, {"prompt": "gone", "max_tokens": 50})
        wait_for(lambda: engine.pending == 1)
        (rid,) = engine.handles
        s.close()
        wait_for(lambda: store.get(rid).status == "aborted")
        assert httpx.get(base + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize("batched", [False, True])
def test_prompts_at_rest_only_when_asked(tmp_path, batched):
    rows = sqlite_store(tmp_path / "p.db")
    store = StoreWriter(rows) if batched else rows
    if batched:
        store.start()
    frontend = make_frontend(FakeEngine(), store=store)
    frontend.store_prompts = False
    handle, _ = frontend.start(GenerateParams(prompt="secret text", request_id="p1"))
    list(frontend.follow(handle))
    if batched:
        assert store.close()
    row = rows.get("p1")
    assert (row.prompt, row.prompt_tokens, row.status) == ("", 11, "finished")
    assert rows.finished_pairs() == []  # nothing to retrain on without the text


def test_a_terminal_row_never_changes_again(tmp_path):
    store = sqlite_store(tmp_path / "t.db")
    store.add("r", "p", 1, 8, arrival_s=0.0)
    store.finish("r", 3, 1.0)
    store.abort("r", 2.0)
    store.fail("r", "late", 3.0)
    row = store.get("r")
    assert (row.status, row.response_tokens, row.finished_s, row.fail_reason) == (
        "finished",
        3,
        1.0,
        None,
    )
