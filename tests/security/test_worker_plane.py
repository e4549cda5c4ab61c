"""Finding 1 (critical): the worker plane could be hijacked.

Before: only Register checked the worker secret. A peer that connected to the scheduler's ROUTER
announcing a registered worker's id as its routing id (ROUTER_HANDOVER handed it over) received
that worker's plans (other users' prompt tokens), could forge sampled tokens and knocked the
real worker out; the secret travelled in cleartext and showed in `ps` (`--auth-token`).

Now: CURVE with allow-listed keys, routing ids the ROUTER's own, every frame bound to the key
its worker registered with, keys and secrets from files and the environment only. The helpers
here (keys, an in-process echo worker, a secure engine) are shared by the other
test_worker_plane_*.py modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

zmq = pytest.importorskip("zmq")

from ecoserve_common.curve import (  # noqa: E402
    KeysError,
    ServerKeys,
    WorkerKeys,
    add_worker,
    connect_curve,
    init_keys,
)
from ecoserve_common.pb import worker_pb2 as pb  # noqa: E402
from ecoserve_common.wire import decode, encode  # noqa: E402
from ecoserve_scheduler.core import Request, SamplingParams, SchedulerCore, make_policy  # noqa: E402
from ecoserve_scheduler.live import LiveEngine  # noqa: E402
from ecoserve_scheduler.live.settings import SchedulerSettings  # noqa: E402
from ecoserve_scheduler.live.worker_plane import Inbound  # noqa: E402
from ecoserve_worker.backends import EchoBackend  # noqa: E402
from ecoserve_worker.server import WorkerServer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-for-tests"
WAIT_S = 60  # only reached when something is broken


def wait_for(pred, timeout: float = WAIT_S, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(every)


class ThreadWorker:
    """A WorkerServer (echo backend unless given one) on a thread of this process."""

    def __init__(self, addr: str, wid: str = "w0", keys=None, backend=None, **kw) -> None:
        kw.setdefault("heartbeat_s", 0.1)
        self.server = WorkerServer(
            addr, wid, backend or EchoBackend(64, 16, 128), TOKEN, poll_s=0.01, keys=keys, **kw
        )
        self.rc: list[int] = []
        self.thread = threading.Thread(target=lambda: self.rc.append(self.server.run()))
        self.thread.daemon = True
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)


def env_without_worker_plane() -> dict[str, str]:
    drop = ("ECOSERVE_WORKER_KEYS_DIR", "ECOSERVE_WORKER_PLANE_INSECURE")
    return {k: v for k, v in os.environ.items() if k not in drop}


def submit(engine, rid: str, max_tokens: int = 8):
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return engine.submit(Request(rid, 4, 0.0, sp, prompt_token_ids=(5, 6, 7, 8)))


@pytest.fixture
def keys_dir(tmp_path) -> Path:
    return init_keys(tmp_path / "keys")


@pytest.fixture
def secure(keys_dir):
    """A started LiveEngine with CURVE keys and one registered echo worker "w0"."""
    engine = LiveEngine(
        SchedulerCore(make_policy("vllm")), auth_token=TOKEN, keys=ServerKeys.load(keys_dir)
    ).start()
    worker = ThreadWorker(engine.address, keys=WorkerKeys.load(keys_dir))
    wait_for(lambda: engine.worker_ids() == ["w0"])
    yield engine
    worker.stop()
    engine.stop()


def attacker(ctx, addr: str, routing_id: bytes | None = None, keys: WorkerKeys | None = None):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)  # what the real worker used to announce
    if keys is not None:
        connect_curve(sock, keys)
    sock.connect(addr)
    return sock


def register(incarnation: str = "evil", **kw) -> pb.Register:
    """A Register as an echo worker with the right secret would send it."""
    fields = dict(model_id="echo", block_size=16, num_blocks=64, token_budget=128, device="echo")
    return pb.Register(auth_token=TOKEN, incarnation=incarnation, **{**fields, **kw})


def received(sock, seconds: float) -> list[tuple[pb.Envelope, str]]:
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            out.append(decode(sock.recv()))
    return out


# ---- the hijack ----------------------------------------------------------------------------


def test_a_peer_without_an_allowed_key_gets_nothing_even_with_the_workers_id(secure, tmp_path):
    """The attack of the finding, twice: a plain (NULL) peer, and a CURVE peer that knows the
    scheduler's public key but holds no allowed key. Both announce the worker's id and send it
    the right secret; neither receives a frame, and the real worker keeps serving."""
    engine = secure
    ctx = zmq.Context()
    stranger_keys = tmp_path / "stranger"
    init_keys(stranger_keys)  # a key pair of its own, in no allow-list of this scheduler
    own = WorkerKeys.load(stranger_keys)
    server_public = ServerKeys.load(tmp_path / "keys").pair.public
    forged = WorkerKeys(own.pair, server_public)
    socks = [attacker(ctx, engine.address, b"w0"), attacker(ctx, engine.address, b"w0", forged)]
    try:
        handles = [submit(engine, f"r{i}", max_tokens=200) for i in range(4)]
        for sock in socks:
            sock.send(encode("w0", register()))
            sock.send(encode("w0", pb.Heartbeat(sent_s=1.0)))
        for sock in socks:
            assert received(sock, 1.5) == []  # no plan, no reply: no handshake at all
        for h in handles:
            assert h.wait(WAIT_S) and h.finish_reason == "length" and len(h.tokens) == 200
        assert engine.worker_ids() == ["w0"] and engine.workers_dropped == 0
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()


def test_another_allowed_key_cannot_take_a_registered_worker_id(secure, keys_dir, tmp_path):
    """Handover must not let another key steal a registered identity: a second allowed key
    pair (another worker host) registering as "w0", with the routing id "w0" too, is refused and
    receives no plan; w0 is not dropped."""
    engine = secure
    other = WorkerKeys.load(add_worker(keys_dir, "other-host", tmp_path / "other"))
    ctx = zmq.Context()
    sock = attacker(ctx, engine.address, b"w0", other)
    try:
        handles = [submit(engine, f"r{i}", max_tokens=100) for i in range(4)]
        sock.send(encode("w0", register("new")))
        got = received(sock, 1.5)
        assert [body for _, body in got] == ["registered"]
        assert not got[0][0].registered.accepted
        assert "another key" in got[0][0].registered.reason
        for h in handles:
            assert h.wait(WAIT_S) and len(h.tokens) == 100
        assert engine.worker_ids() == ["w0"] and engine.workers_dropped == 0
    finally:
        sock.close(0)
        ctx.term()


def test_a_frame_with_another_key_on_a_workers_connection_drops_that_worker(keys_dir):
    """The invariant behind it, on an engine not started: a registered worker's frames must
    carry the key it registered with; one that does not means the connection is not that
    worker's any more, and no plan may go there again."""
    from ecoserve_scheduler.core import WorkerSpec

    engine = LiveEngine(SchedulerCore(make_policy("vllm")), keys=ServerKeys.load(keys_dir))
    try:
        engine.core.add_worker(WorkerSpec("w0", 64, 16, 128))
        engine._plane.add(b"\x00conn1", "KEY-A", "w0", "inc", 0.0)
        heartbeat = encode("w0", pb.Heartbeat(sent_s=1.0))
        w0 = engine._workers["w0"]
        engine._on_inbound(Inbound(b"\x00conn1", "KEY-A", heartbeat, w0))
        assert engine.worker_ids() == ["w0"]
        engine._on_inbound(Inbound(b"\x00conn1", "KEY-B", heartbeat, w0))
        assert engine.worker_ids() == [] and engine._plane.routes == {}
    finally:
        engine.stop()


# ---- keys on disk --------------------------------------------------------------------------


def test_keys_are_private_and_an_unprotected_secret_is_refused(tmp_path):
    root = init_keys(tmp_path / "keys")
    assert root.stat().st_mode & 0o777 == 0o700
    assert (root / "workers").stat().st_mode & 0o777 == 0o700
    for name in ("server.key_secret", "worker.key_secret"):
        assert (root / name).stat().st_mode & 0o777 == 0o600
    first = ServerKeys.load(root).pair
    assert init_keys(root) == root and ServerKeys.load(root).pair == first  # kept, not remade
    WorkerKeys.load(root)
    (root / "worker.key_secret").chmod(0o644)
    with pytest.raises(KeysError, match="chmod 600"):
        WorkerKeys.load(root)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(KeysError, match="chmod 700"):
        init_keys(shared)  # an existing directory others can read is not used (nor chmod-ed)
    out = add_worker(root, "gpu-host-1", tmp_path / "bundle")
    bundle = WorkerKeys.load(out)
    assert bundle.server_public == first.public
    assert (root / "workers" / "gpu-host-1.key").is_file()


# ---- secrets never in argv -----------------------------------------------------------------


def test_secrets_are_refused_on_command_lines(tmp_path):
    from ecoserve_worker.__main__ import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--scheduler", "tcp://x:1", "--auth-token", "t"])
    with pytest.raises(SystemExit):
        SchedulerSettings.load(["--worker-auth-token", "t"], environ={})
    env = {"ECOSERVE_WORKER_AUTH_TOKEN": "from-env"}
    assert SchedulerSettings.load([], environ=env).worker_auth_token == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    s = SchedulerSettings.load(["--worker-auth-token-file", str(tmp_path / "token")], environ={})
    assert s.worker_auth_token == "from-file"


def test_ecoserve_up_makes_private_keys_and_passes_secrets_in_the_environment(
    tmp_path, monkeypatch
):
    from ecoserve_stack import launcher

    started: list[tuple[list[str], dict]] = []

    class FakeProcess:
        def __init__(self, argv, env):
            started.append((argv, env))

        def poll(self):
            return None

    monkeypatch.setattr(launcher.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(launcher, "_wait_ready", lambda *a: None)
    monkeypatch.setattr(launcher, "prepare_model", lambda spec, home: ("m", "/m"))
    args = ["--home", str(tmp_path), "--no-predictor", "--workers", "2", "--token-budget", "64"]
    launcher.start_stack(launcher.build_parser().parse_args(args))
    assert [argv[2] for argv, _ in started] == ["ecoserve_scheduler.live.serve"] + [
        "ecoserve_worker"
    ] * 2
    keys = tmp_path / "keys"
    assert keys.stat().st_mode & 0o777 == 0o700
    assert (keys / "server.key_secret").stat().st_mode & 0o777 == 0o600
    for argv, env in started:
        token = env["ECOSERVE_WORKER_AUTH_TOKEN"]
        assert len(token) >= 32 and token not in " ".join(argv)
        assert "--auth-token" not in argv and env["ECOSERVE_WORKER_KEYS_DIR"] == str(keys)


# ---- secure by default ---------------------------------------------------------------------


def test_serve_refuses_to_start_without_worker_keys(model_dir, tmp_path):
    cmd = [sys.executable, "-m", "ecoserve_scheduler.live.serve", "--model", str(model_dir)]
    cmd += ["--http-address", "", "--grpc-address", "127.0.0.1:0"]
    cmd += ["--worker-bind", "tcp://127.0.0.1:0", "--db-url", f"sqlite:///{tmp_path / 'db'}"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=env_without_worker_plane()
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--worker-keys-dir" in proc.stderr and "ecoserve_common.curve init" in proc.stderr
    assert "--worker-plane-insecure" in proc.stderr


def test_a_worker_refuses_to_start_without_keys():
    cmd = [sys.executable, "-m", "ecoserve_worker", "--scheduler", "tcp://127.0.0.1:9"]
    cmd += ["--worker-id", "w0", "--echo"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env=env_without_worker_plane()
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--keys-dir" in proc.stderr and "--insecure" in proc.stderr


def test_a_real_worker_process_serves_over_curve_through_the_engine_core(model_dir, keys_dir):
    """End to end as `serve` runs it: the engine core in its own process with the keys, a
    tiny-model worker process with the same directory; no secret on either command line."""
    pytest.importorskip("torch")
    from test_live_engine import start_worker  # tests/ is on sys.path (conftest)

    from ecoserve_scheduler.live.engine_client import EngineClient

    engine = EngineClient("vllm", auth_token=TOKEN, worker_keys_dir=str(keys_dir)).start()
    proc = start_worker(engine.address, "w0", model_dir, token=TOKEN, keys_dir=keys_dir)
    try:
        wait_for(lambda: engine.worker_ids() == ["w0"])
        h = submit(engine, "curve-1", max_tokens=6)
        assert h.wait(WAIT_S) and h.finish_reason == "length" and len(h.tokens) == 6
        wait_for(lambda: engine.stats_snapshot["engine"]["steps"] > 0)
        assert engine.stats_snapshot["engine"]["worker_plane_secure"] is True
        for pid in (engine.pid, proc.pid):
            assert TOKEN.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        proc.kill()
        proc.wait()
        engine.stop()
