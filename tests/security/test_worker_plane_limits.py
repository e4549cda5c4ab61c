"""Finding 3 (ZeroMQ part): an 800 MB frame took 2.1 GB of scheduler memory, and a million
small messages blocked the engine loop for 37 s.

Now: both ends refuse frames over MAX_FRAME_BYTES (16 MiB; libzmq drops the connection on the
frame's header, before buffering it), and frames from connections that are not registered
workers are read at most at a small rate (per connection and in total) and otherwise dropped
unread, so a flood neither earns replies nor starves the registered workers.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

zmq = pytest.importorskip("zmq")

from test_worker_plane import (  # noqa: E402
    TOKEN,
    WAIT_S,
    ThreadWorker,
    received,
    register,
    submit,
    wait_for,
)

from ecoserve_common.curve import (  # noqa: E402
    MAX_FRAME_BYTES,
    ServerKeys,
    WorkerKeys,
    connect_curve,
    init_keys,
)
from ecoserve_common.pb import worker_pb2 as pb  # noqa: E402
from ecoserve_common.wire import encode  # noqa: E402
from ecoserve_scheduler.core import SchedulerCore, make_policy  # noqa: E402
from ecoserve_scheduler.live import LiveEngine  # noqa: E402
from ecoserve_scheduler.live.worker_plane import PeerBudget  # noqa: E402

BIG = MAX_FRAME_BYTES + 4 * 2**20


def test_an_oversized_frame_is_dropped_before_the_scheduler_reads_it(tmp_path):
    """Even from an allowed key: a 20 MiB Register gets no answer (the connection is cut on
    its header) and registers nothing; the same peer's next, normal Register is served."""
    keys = init_keys(tmp_path / "keys")
    engine = LiveEngine(
        SchedulerCore(make_policy("vllm")),
        auth_token=TOKEN,
        keys=ServerKeys.load(keys),
        worker_timeout_s=30.0,  # this raw peer does not heartbeat
    ).start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    connect_curve(sock, WorkerKeys.load(keys))
    sock.connect(engine.address)
    try:
        sock.send(encode("w0", register(model_id="x" * BIG)))
        assert received(sock, 2.0) == [] and engine.worker_ids() == []
        sock.send(encode("w0", register()))  # the DEALER has reconnected by now
        got = received(sock, 2.0)
        assert [env.registered.accepted for env, _ in got] == [True]
        assert engine.worker_ids() == ["w0"]
    finally:
        sock.close(0)
        ctx.term()
        engine.stop()


def test_a_worker_drops_an_oversized_frame_unread():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    addr = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    worker = ThreadWorker(addr, heartbeat_s=60.0)
    try:
        assert router.poll(10_000)
        peer, _ = router.recv_multipart()
        router.send_multipart([peer, encode("scheduler", pb.Registered(accepted=True))])
        router.send_multipart([peer, encode("s" * BIG, pb.Heartbeat(sent_s=777.0))])
        # Read, it would be echoed at once; unread, nothing comes back and the worker lives.
        assert not router.poll(2000)
        assert worker.thread.is_alive()
    finally:
        worker.stop()
        router.close(0)
        ctx.term()


FLOOD = textwrap.dedent(
    """
    import sys, time, zmq
    addr, seconds, peers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    ctx = zmq.Context()
    socks = []
    for _ in range(peers):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(addr)
        socks.append(s)
    time.sleep(0.3)
    sent = replies = 0
    junk = [b"\\x00garbage\\xff", b"\\x08\\x02\\x12\\x01x\\x62\\x00"]  # bad; a valid Heartbeat
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s in socks:
            for k in range(200):
                try:
                    s.send(junk[k % 2], zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    break
            while s.poll(0):
                s.recv()
                replies += 1
    time.sleep(0.5)
    for s in socks:
        while s.poll(0):
            s.recv()
            replies += 1
    print(sent, replies, flush=True)
    """
)


def test_a_flood_from_strangers_earns_few_replies_and_does_not_starve_workers():
    engine = LiveEngine(SchedulerCore(make_policy("vllm")), auth_token=TOKEN).start()
    worker = ThreadWorker(engine.address)
    seconds, peers = 4.0, 4
    try:
        wait_for(lambda: engine.worker_ids() == ["w0"])
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOOD, engine.address, str(seconds), str(peers)],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)  # the flood is on
        t0 = time.monotonic()
        handles = [submit(engine, f"r{i}", max_tokens=32) for i in range(8)]
        for h in handles:
            assert h.wait(WAIT_S) and h.finish_reason == "length" and len(h.tokens) == 32
        served_in = time.monotonic() - t0
        out, _ = flood.communicate(timeout=60)
        sent, replies = map(int, out.split())
        budget = PeerBudget()
        allowed = budget.total_burst + budget.total_rate * (seconds + 1.5)
        assert sent > 10 * allowed, "the flood was not a flood"
        assert replies <= allowed, (sent, replies)
        assert engine._plane.dropped > 10 * allowed  # read and dropped: no decode, no reply
        assert served_in < 10.0, served_in  # a few ms without the flood
        assert engine.worker_ids() == ["w0"] and engine.workers_dropped == 0
    finally:
        worker.stop()
        engine.stop()


def test_peer_budget_rations_each_peer_and_all_together():
    b = PeerBudget(rate=2.0, burst=5.0, total_rate=50.0, total_burst=100.0)
    assert sum(b.allow(b"a", 0.0) for _ in range(20)) == 5  # a burst, then nothing
    assert sum(b.allow(b"a", 1.0) for _ in range(20)) == 2  # two more a second later
    many = sum(b.allow(bytes([i, j]), 1.0) for i in range(30) for j in range(30))
    assert many == 98  # every peer is new, but together they get what the total has left
