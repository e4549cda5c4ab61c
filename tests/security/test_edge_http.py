"""The HTTP edge under a careless or hostile client (issue "Hardening", findings 3, 5 and 9):
bodies bounded before they are parsed, prompts bounded before they are tokenized, tokenizing
off the event loop in the app's own pool, admission decided at once and atomically, probes
never starved by waiting streams, half-sent headers and slow bodies cut off, and the API key
on every route but the probes.

Everything runs in-process against a fake engine and tokenizer (no model, no worker), served by
a real uvicorn on a free port where sockets matter. The fakes are imported by the other
tests/security modules.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn
from conftest import free_port
from fastapi.testclient import TestClient

from ecoserve_scheduler.core.events import FinishEvent, TokenEvent
from ecoserve_scheduler.live.engine import RequestHandle
from ecoserve_scheduler.live.frontend import ApiLimits, Frontend, GenerateParams
from ecoserve_scheduler.live.http_api import HttpLimits, create_app, uvicorn_config
from ecoserve_scheduler.live.prediction import PredictorClient

# ---- fakes shared by tests/security ------------------------------------------------------------


class FakeTokenizer:
    """One token per character (ids 3..98), EOS 2, no chat template; counts encode calls and
    the threads they ran on."""

    eos_token_id = 2
    chat_template = None

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate  # when given, every encode waits until it is set
        self.threads: list[str] = []
        self.running = self.most_running = 0
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self._lock:
            self.threads.append(threading.current_thread().name)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                self.gate.wait(30)
            return [ord(c) % 96 + 3 for c in text]
        finally:
            with self._lock:
                self.running -= 1

    def decode(self, ids) -> str:
        return "".join(chr(i - 3 + 32) if 3 <= i < 99 else "?" for i in ids)


class FakeEngine:
    """Stands in for LiveEngine / EngineClient. Each request gets `max_tokens` tokens (id 40,
    "E") and "length" at once, unless `hold`: then it stays pending until `finish` / `run` or
    a cancel ("aborted"). Keeps the most requests it ever held at once."""

    clock = staticmethod(time.monotonic)
    failure = None
    address = "fake"

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.handles: dict[str, tuple[RequestHandle, object]] = {}
        self.submitted: list = []
        self.cancelled: list[str] = []
        self.most_pending = 0
        self.stats_snapshot = {"workers": ["w0"]}
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return len(self.handles)

    def worker_ids(self) -> list[str]:
        return ["w0"]

    def submit(self, request) -> RequestHandle:
        handle = RequestHandle(request.request_id)
        with self._lock:
            self.handles[request.request_id] = (handle, request)
            self.most_pending = max(self.most_pending, len(self.handles))
            self.submitted.append(request)
        if not self.hold:
            self.run(request.request_id)
        return handle

    def tokens(self, rid: str, n: int, token: int = 40) -> None:
        handle, _ = self.handles[rid]
        for _ in range(n):
            handle.tokens.append(token)
            handle.events.put(TokenEvent(rid, token, len(handle.tokens) - 1))

    def run(self, rid: str) -> None:
        self.tokens(rid, self.handles[rid][1].sampling.max_tokens)
        self.finish(rid, "length")

    def finish(self, rid: str, reason: str) -> None:
        with self._lock:
            entry = self.handles.pop(rid, None)
        if entry is not None:
            handle = entry[0]
            handle.finish_reason = reason
            handle.events.put(FinishEvent(rid, reason))
            handle.done.set()

    def finish_all(self, reason: str = "length") -> None:
        for rid in list(self.handles):
            self.finish(rid, reason)

    def cancel(self, rid: str) -> None:
        self.cancelled.append(rid)
        self.finish(rid, "aborted")


class SlowPredictor(PredictorClient):
    """No predictor, but each call takes `delay_s` (widens any check-then-act window)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(None)
        self.delay_s = delay_s

    def predict(self, prompt: str, history=()):
        time.sleep(self.delay_s)
        return self.default


def make_frontend(engine=None, tokenizer=None, store=None, **limits) -> Frontend:
    limits.setdefault("max_model_len", 2048)
    limits.setdefault("vocab_size", 512)
    return Frontend(
        engine or FakeEngine(), tokenizer or FakeTokenizer(), store, ApiLimits(**limits)
    )


@contextlib.contextmanager
def served(app, limits: HttpLimits | None = None) -> Iterator[str]:
    """`app` on a real uvicorn (uvicorn_config, so its connection limits apply): the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def raw_request(port: int, body: dict, path: str = "/v1/completions") -> socket.socket:
    """A POST sent on its own socket, its response left unread."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    s.sendall(head.encode() + data)
    return s


def closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes `s` within `seconds` (whatever it sends first)."""
    s.settimeout(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if s.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


# ---- finding 3: bodies and prompts bounded, tokenizing off the loop --------------------------


def test_a_body_over_the_limit_is_a_413_before_anything_parses_it():
    engine = FakeEngine()
    app = create_app(make_frontend(engine), "tiny", limits=HttpLimits(max_body_bytes=4096))
    big = {"prompt": "x" * 10_000, "max_tokens": 1}
    with TestClient(app) as c:
        r = c.post("/v1/completions", json=big)
        assert r.status_code == 413 and "4096" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b"x" * 1000

        chunked = c.post("/v1/completions", content=chunks())
        assert chunked.status_code == 413
        assert c.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200
    assert len(engine.submitted) == 1


def test_a_prompt_over_the_character_limit_is_refused_before_it_is_tokenized():
    tok = FakeTokenizer()
    app = create_app(make_frontend(tokenizer=tok, max_prompt_chars=1000), "tiny")
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "y" * 1001, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        chat = {"messages": [{"role": "user", "content": "z" * 1001}], "max_tokens": 1}
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        ids = c.post("/v1/completions", json={"prompt": [5] * 3000, "max_tokens": 1})
        assert ids.status_code == 400 and ids.json()["error"]["param"] == "prompt"
    assert tok.threads == []  # nothing was tokenized


def test_tokenizing_runs_in_the_apps_bounded_pool_and_health_stays_quick():
    gate = threading.Event()
    tok = FakeTokenizer(gate)
    limits = HttpLimits(start_threads=2)
    app = create_app(make_frontend(tokenizer=tok), "tiny", limits=limits)
    with served(app, limits) as base:

        def one(i: int) -> int:
            body = {"prompt": f"prompt {i}", "max_tokens": 2}
            return httpx.post(base + "/v1/completions", json=body, timeout=30).status_code

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        wait_for(lambda: tok.running == 2)  # the start pool is full and held
        # /health answers while every tokenizing thread is still blocked: it is not queued
        # behind them (a causal check, not a wall-clock one)
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        assert tok.running == 2 and not gate.is_set()
        gate.set()
        for t in threads:
            t.join(30)
    assert len(tok.threads) == 8 and all(n.startswith("http-start") for n in tok.threads)
    assert tok.most_running <= 2


# ---- finding 5: admission at once and atomic; probes never starved ---------------------------


def test_admission_is_atomic_and_a_429_comes_at_once_with_retry_after():
    engine = FakeEngine(hold=True)
    frontend = make_frontend(engine, max_pending=5)
    frontend.predictor = SlowPredictor(0.1)  # every start takes a while
    app = create_app(frontend, "tiny", limits=HttpLimits(start_threads=8))
    codes: list[int] = []
    with served(app) as base:

        def one(i: int) -> None:
            body = {"prompt": f"p{i}", "max_tokens": 2}
            codes.append(httpx.post(base + "/v1/completions", json=body, timeout=30).status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        wait_for(lambda: len(codes) == 15)  # the refused ones answer while five are held
        wait_for(lambda: engine.pending == 5)
        assert engine.most_pending == 5
        r = httpx.post(base + "/v1/completions", json={"prompt": "late"}, timeout=5)
        assert r.status_code == 429 and engine.pending == 5  # answered while all five are held
        assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
        engine.finish_all()
        for t in threads:
            t.join(30)
    assert sorted(codes) == [200] * 5 + [429] * 15
    assert engine.most_pending == 5


def test_waiting_streams_never_starve_health_metrics_and_stats():
    engine = FakeEngine(hold=True)
    app = create_app(make_frontend(engine), "tiny")
    with served(app) as base:
        port = int(base.rsplit(":", 1)[1])
        socks = [raw_request(port, {"prompt": f"s{i}", "stream": True}) for i in range(60)]
        socks += [raw_request(port, {"prompt": f"w{i}"}) for i in range(20)]  # non-streaming
        try:
            wait_for(lambda: engine.pending == 80)
            for path in ("/health", "/metrics", "/stats"):  # answered while all 80 are held
                assert httpx.get(base + path, timeout=3).status_code == 200, path
                assert engine.pending == 80, path
        finally:
            engine.finish_all()
            for s in socks:
                s.close()


# ---- finding 9: half-sent headers, slow bodies, the API key --------------------------------


def test_a_half_sent_header_or_a_silent_socket_is_disconnected():
    limits = HttpLimits(header_timeout_s=1.0, body_timeout_s=1.0)
    app = create_app(make_frontend(), "tiny", limits=limits)
    with served(app, limits) as base:
        port = int(base.rsplit(":", 1)[1])
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the blank line never comes
        silent = socket.create_connection(("127.0.0.1", port))
        trickle = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        for ch in b"GET /health HTTP/1.1\r\nX-A: ":  # one byte at a time, never finishing
            with contextlib.suppress(OSError):
                trickle.sendall(bytes([ch]))
            time.sleep(0.05)
        assert closed_within(trickle, 4.0) and time.monotonic() - t0 < 5.0
        assert closed_within(half, 2.0) and closed_within(silent, 2.0)
        # after a whole response, a keep-alive connection that starts a head and stalls
        kept = socket.create_connection(("127.0.0.1", port))
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in kept.recv(65536)
        kept.sendall(b"GET /health HTTP/1.1\r\n")
        assert closed_within(kept, 4.0)
        # a body that never completes is a 408
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        slow.settimeout(5)
        assert b" 408 " in slow.recv(65536)
        for s in (half, silent, trickle, kept, slow):
            s.close()
        assert httpx.get(base + "/health", timeout=5).status_code == 200  # still serving


def test_with_an_api_key_every_route_but_the_probes_needs_it():
    app = create_app(make_frontend(), "tiny", api_key="s3cret")
    key = {"Authorization": "Bearer s3cret"}
    with TestClient(app) as c:
        for path in ("/v1/models", "/docs", "/openapi.json", "/nope"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        # refused before the body is read: a huge Content-Length is a 401, not a 413
        big = c.post("/v1/completions", content=b"x" * (5 << 20))
        assert big.status_code == 401
        for path in ("/health", "/metrics", "/stats"):
            assert c.get(path).status_code == 200
        assert c.get("/v1/models", headers=key).status_code == 200
        ok = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=key)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_every_error_has_openais_shape():
    app = create_app(make_frontend(), "tiny")
    with TestClient(app, raise_server_exceptions=False) as c:
        for r in (
            c.get("/nope"),
            c.delete("/v1/completions"),
            c.post("/v1/completions", content=b"{not json", headers={"content-type": "x"}),
            c.post("/v1/completions", json={"prompt": 5}),
            c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10**4000}),
            c.post(  # more digits than Python's int parsing takes
                "/v1/completions",
                content=b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}",
                headers={"content-type": "application/json"},
            ),
        ):
            assert 400 <= r.status_code < 500, (r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_with_no_worker_registered_a_request_fails_at_once_with_503_and_a_reason():
    """Finding 8: requests used to wait silently while no worker was registered. Bad input is
    still a 400 (validation first); `queue_without_workers` restores waiting."""
    engine = FakeEngine(hold=True)
    engine.worker_ids = lambda: []  # e.g. the only worker is restarting
    with served(create_app(make_frontend(engine), "tiny")) as base:
        body = {"prompt": "hi", "max_tokens": 2}
        r = httpx.post(base + "/v1/completions", json=body, timeout=30)
        bad = httpx.post(base + "/v1/completions", json={**body, "max_tokens": 0}, timeout=30)
        health = httpx.get(base + "/health", timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "service_unavailable"
    assert "no worker is registered" in r.json()["error"]["message"]
    assert bad.status_code == 400 and engine.submitted == [] and health.status_code == 503
    queued = make_frontend(engine, queue_without_workers=True)
    handle, _ = queued.start(GenerateParams(prompt="hi"))
    assert engine.submitted and engine.pending == 1
    engine.finish_all()
    assert handle.done.is_set()
