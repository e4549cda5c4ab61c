"""The scheduler's end of the worker plane: one ROUTER socket, and who is on each connection.

Why it is built this way (issue "Hardening"):

- **CURVE, allow-listed keys.** With `ServerKeys` the socket is a CURVE server and the ZAP
  handler admits only the allow-list's public keys (`ecoserve_common.curve`): a peer without an
  allowed key never completes the handshake, so it can neither read plans nor send a frame.
- **Routing ids are the ROUTER's.** Workers set no routing id, so each connection gets its own
  from libzmq and ROUTER_HANDOVER stays off: no peer can claim a registered worker's connection
  by announcing its id (the hijack that handed another user's prompts to whoever asked).
- **Every frame bound to its key.** Each frame carries the ZAP User-Id of its connection (the
  client's Z85 public key); a registered worker's frames must carry the key it registered with,
  and a worker id registered under one key cannot be registered under another while it lives.
- **Strangers are rationed.** A frame from a connection that is not a registered worker is
  dropped unread above STRANGER_MAX_BYTES (a Register is ~100 bytes), else decoded (bounded
  work); its Register is handled at most at `registers`' rates, and it is answered (Error
  "unregistered" / "malformed") at most at `replies`' rates (each per connection and in
  total); the rest are dropped. A flood earns almost no replies, and since the loop reads at
  most 64 frames a tick, fair-queued by connection, it never starves registered workers. The
  two budgets are separate so that a worker heartbeating at a new scheduler still gets its
  Register through.
- **Bounded frames.** MAXMSGSIZE (`curve.MAX_FRAME_BYTES`) drops a connection that announces a
  bigger frame, and RCVHWM bounds what one connection can queue.

Invariant: only the engine's loop thread calls this object (ZeroMQ sockets are not
thread-safe); `routes` and `workers` always describe the same connections.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass

import zmq

from ecoserve_common.curve import ServerKeys, limit_frames, serve_curve, start_authenticator
from ecoserve_common.pb import worker_pb2 as pb

log = logging.getLogger(__name__)

RCVHWM = 256  # frames one connection may queue unread (a worker has ~2 in flight)
STRANGER_MAX_BYTES = 16 * 1024  # the largest frame decoded from a peer not registered
WORKER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


@dataclass
class WorkerConn:
    """A registered worker: its connection, the key it proved, which start of its process."""

    worker_id: str
    routing_id: bytes
    key: str  # ZAP User-Id (the Z85 public key) it registered with; "" on an insecure plane
    incarnation: str  # random per worker process start: a new one means its KV pool is gone
    last_seen: float
    steps: int = 0
    plan_sent_s: float = 0.0
    slowest_step_s: float = 0.0  # longest plan-to-result time seen: the in-flight allowance


@dataclass
class Inbound:
    routing_id: bytes
    key: str
    data: bytes
    worker: WorkerConn | None  # the registered worker on this connection; None: a stranger


class PeerBudget:
    """Token buckets for strangers' frames: `rate` a second per connection (burst `burst`) and
    `total_rate` for all strangers together (the oldest of `max_peers` connections is
    forgotten first, so its memory is bounded too)."""

    def __init__(
        self,
        rate: float = 2.0,
        burst: float = 5.0,
        total_rate: float = 50.0,
        total_burst: float = 100.0,
        max_peers: int = 4096,
    ) -> None:
        self.rate, self.burst = rate, burst
        self.total_rate, self.total_burst = total_rate, total_burst
        self.max_peers = max_peers
        self._peers: OrderedDict[bytes, tuple[float, float]] = OrderedDict()
        self._total = (total_burst, 0.0)

    def allow(self, peer: bytes, now: float) -> bool:
        tokens, at = self._peers.pop(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        total, total_at = self._total
        total = min(self.total_burst, total + (now - total_at) * self.total_rate)
        ok = tokens >= 1.0 and total >= 1.0
        if ok:
            tokens, total = tokens - 1.0, total - 1.0
        self._peers[peer] = (tokens, now)  # most recent last: the oldest is forgotten first
        if len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        self._total = (total, now)
        return ok


def refusal(worker_id: str, reg: pb.Register, auth_token: str) -> str:
    """Why a Register cannot be accepted, whoever sends it ("" when it can)."""
    if not WORKER_ID.fullmatch(worker_id):
        return "worker id must be 1-128 letters, digits or . _ : @ -"
    if not hmac.compare_digest(reg.auth_token.encode(), auth_token.encode()):
        return "bad auth token"
    if reg.num_blocks <= 0 or reg.block_size <= 0:
        return "no KV blocks announced"
    return ""


def user_id(frame: zmq.Frame) -> str:
    """The ZAP User-Id of the connection a frame came on ("" where there is none: NULL)."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return ""


class WorkerPlane:
    def __init__(self, ctx: zmq.Context, bind: str, keys: ServerKeys | None = None) -> None:
        self.secure = keys is not None
        # The ZAP handler must be up before the socket binds: a CURVE client that connected
        # first would otherwise meet a socket with no handler (refused, by ZAP_ENFORCE_DOMAIN).
        self._auth = start_authenticator(ctx, keys) if keys is not None else None
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)  # libzmq's default, stated: no id takeover
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        limit_frames(sock)
        if keys is not None:
            serve_curve(sock, keys)
        try:
            sock.bind(bind)
        except zmq.ZMQError:
            sock.close()
            self._stop_auth()
            raise
        self.sock = sock
        self.address: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.workers: dict[str, WorkerConn] = {}
        self.routes: dict[bytes, str] = {}
        self.replies = PeerBudget()  # Errors answering strangers
        self.registers = PeerBudget(total_rate=200.0, total_burst=200.0)  # their Registers
        self.dropped = 0  # strangers' frames neither handled nor answered, and bad framing

    def close(self) -> None:
        self.sock.close()
        self._stop_auth()

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # ---- frames in and out -------------------------------------------------------------------

    def read(self) -> Inbound | None:
        """The next message (the caller polled for it), or None when it was dropped unread."""
        frames = self.sock.recv_multipart(copy=False)
        if len(frames) != 2:
            self.dropped += 1
            return None
        rid = frames[0].bytes
        wid = self.routes.get(rid)
        worker = None if wid is None else self.workers[wid]
        if worker is None and len(frames[1]) > STRANGER_MAX_BYTES:
            self.dropped += 1
            return None
        key = user_id(frames[1]) if self.secure else ""
        return Inbound(rid, key, frames[1].bytes, worker)

    def send(self, worker: WorkerConn, frame: bytes) -> None:
        self.sock.send_multipart([worker.routing_id, frame])

    def send_to(self, routing_id: bytes, frame: bytes) -> None:
        self.sock.send_multipart([routing_id, frame])

    def reply(self, inbound: Inbound, frame: bytes, now: float) -> None:
        """Answer a frame: a worker's always, a stranger's while `replies` allows."""
        if inbound.worker is None and not self.replies.allow(inbound.routing_id, now):
            self.dropped += 1
            return
        self.sock.send_multipart([inbound.routing_id, frame])

    def may_register(self, inbound: Inbound, now: float) -> bool:
        """Whether a Register on this connection is handled now (a stranger's are rationed)."""
        if inbound.worker is None and not self.registers.allow(inbound.routing_id, now):
            self.dropped += 1
            return False
        return True

    # ---- who is who --------------------------------------------------------------------------

    def classify(self, rid: bytes, key: str, worker_id: str, incarnation: str) -> tuple[str, str]:
        """What a Register on connection `rid` with `key` is: ("new" | "again" | "moved" |
        "restarted" | "refused", reason). "again": the same process on the same connection
        (acknowledge only); "moved": the same process on a new connection; "restarted": a new
        process under a live id (its old pool is gone). A live id under another key, or one
        connection claiming two ids, is refused."""
        if self.secure and not key:
            return "refused", "no authenticated key on this connection"
        held = self.routes.get(rid)
        if held is not None and held != worker_id:
            return "refused", f"this connection is already worker {held!r}"
        w = self.workers.get(worker_id)
        if w is None:
            return "new", ""
        if w.key != key:
            return "refused", f"worker id {worker_id!r} is registered under another key"
        if w.incarnation != incarnation:
            return "restarted", ""
        return ("again" if w.routing_id == rid else "moved"), ""

    def add(self, rid: bytes, key: str, worker_id: str, incarnation: str, now: float) -> None:
        self.workers[worker_id] = WorkerConn(worker_id, rid, key, incarnation, now)
        self.routes[rid] = worker_id

    def move(self, worker_id: str, rid: bytes) -> None:
        w = self.workers[worker_id]
        self.routes.pop(w.routing_id, None)
        w.routing_id = rid
        self.routes[rid] = worker_id

    def remove(self, worker_id: str) -> None:
        w = self.workers.pop(worker_id)
        self.routes.pop(w.routing_id, None)
