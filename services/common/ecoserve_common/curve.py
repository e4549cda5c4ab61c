"""The worker plane's keys: ZeroMQ CURVE key pairs on disk, and the socket limits both ends set.

Why CURVE: the scheduler's ROUTER hands every registered worker other users' prompt tokens and
takes their sampled tokens back. Under the NULL mechanism anyone who could reach the port could
connect, read plans and forge results, and a shared secret in Register travelled in cleartext.
With CURVE every connection is encrypted and the scheduler's ZAP handler admits only the public
keys in its allow-list, so a peer without an allowed key never completes the handshake.

One directory holds everything (`init_keys`; `ecoserve up` makes one under its --home):

    KEYS/                  0700
      server.key           the scheduler's public key: every worker needs a copy
      server.key_secret    the scheduler's key pair (0600)
      worker.key           the shared worker key pair (single host: every local worker uses it)
      worker.key_secret    (0600)
      workers/             the allow-list: one <name>.key (a public key) per worker key allowed

The scheduler reads `server.key_secret` and `workers/`; a worker reads `server.key` and
`worker.key_secret` (`WorkerKeys.load`), so on one host both point at the same directory. For
another host, `add_worker` makes a key pair of its own, allows it, and writes the three files
that host needs into a directory to copy there (services/worker/README.md).

Invariants: a secret key file is never group- or world-accessible (loading one that is raises
KeysError, as ssh refuses an unprotected key) and a directory created here is 0700. Only the
scheduler and the worker import this module (both depend on pyzmq; the SDK does not).

    python -m ecoserve_common.curve init KEYS
    python -m ecoserve_common.curve add-worker KEYS NAME --out DIR
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER = "server"
WORKER = "worker"
ALLOWED = "workers"
# The largest frame either end accepts (ZMQ_MAXMSGSIZE): libzmq drops a connection that announces
# a bigger one before buffering it. A plan of 512 decode rows with 8k-block tables is ~12 MiB of
# varints; a result is a few KiB. Without it an 800 MB frame cost the scheduler 2.1 GB.
MAX_FRAME_BYTES = 16 * 2**20
ZAP_DOMAIN = "ecoserve-workers"
HOW_TO_CREATE = "python -m ecoserve_common.curve init DIR (or `ecoserve keys DIR`)"


class KeysError(RuntimeError):
    """Keys missing, unreadable or unprotected; the message says which file and what to do."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 characters
    secret: bytes


@dataclass(frozen=True)
class ServerKeys:
    """What the scheduler's ROUTER needs: its key pair and the allow-list directory."""

    pair: KeyPair
    allowed_dir: Path

    @classmethod
    def load(cls, keys_dir: str | os.PathLike) -> ServerKeys:
        root = Path(keys_dir)
        pair = load_pair(root / f"{SERVER}.key_secret")
        allowed = root / ALLOWED
        if not allowed.is_dir():
            raise KeysError(
                f"{allowed}: no allow-list of worker keys; create it with {HOW_TO_CREATE}"
            )
        if allowed.stat().st_mode & 0o022:  # whoever can add a file there admits a worker
            raise KeysError(f"{allowed}: others may add keys to it; run `chmod 700 {allowed}`")
        return cls(pair, allowed)


@dataclass(frozen=True)
class WorkerKeys:
    """What a worker's DEALER needs: its own key pair and the scheduler's public key."""

    pair: KeyPair
    server_public: bytes

    @classmethod
    def load(cls, keys_dir: str | os.PathLike) -> WorkerKeys:
        root = Path(keys_dir)
        pair = load_pair(root / f"{WORKER}.key_secret")
        return cls(pair, load_public(root / f"{SERVER}.key"))


# ---- files ----------------------------------------------------------------------------------


def private_dir(path: str | os.PathLike) -> Path:
    """`path` as a directory only its owner can enter: created 0700 (parents as usual), or
    an existing one checked (KeysError if others may read or enter it; never chmod-ed here,
    since it might be a shared directory given by mistake)."""
    p = Path(path)
    if not p.exists():
        p.mkdir(parents=True, mode=0o700)
        p.chmod(0o700)
    elif not p.is_dir():
        raise KeysError(f"{p}: not a directory")
    elif p.stat().st_mode & 0o077:
        raise KeysError(f"{p}: others may read or enter it; run `chmod 700 {p}` (or pick another)")
    return p


def check_private(path: Path) -> None:
    """KeysError unless `path` is a regular file that only its owner can read or write."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeysError(f"{path}: no such key file; create the keys with {HOW_TO_CREATE}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeysError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeysError(
            f"{path}: a secret key readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 600 {path}`"
        )


def load_pair(path: Path) -> KeyPair:
    check_private(path)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeysError(f"{path}: not a key pair ({exc})") from None
    if not secret:
        raise KeysError(f"{path}: holds no secret key")
    return KeyPair(public, secret)


def load_public(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except OSError:
        raise KeysError(
            f"{path}: no such key file; copy the scheduler's {SERVER}.key here"
        ) from None
    except ValueError as exc:
        raise KeysError(f"{path}: not a public key ({exc})") from None
    return public


def allowed_keys(allowed_dir: Path) -> frozenset[bytes]:
    """The Z85 public keys of every `*.key` in the allow-list directory."""
    return frozenset(zmq.auth.load_certificates(allowed_dir))


def _create_pair(directory: Path, name: str) -> None:
    """`name`.key and `name`.key_secret in `directory` (already 0700), the secret made 0600.
    An existing pair is kept: keys are created once and reused."""
    if (directory / f"{name}.key_secret").exists():
        return
    public, secret = zmq.auth.create_certificates(directory, name)
    Path(secret).chmod(0o600)
    Path(public).chmod(0o644)


def init_keys(keys_dir: str | os.PathLike) -> Path:
    """The scheduler's key pair, a shared worker key pair and an allow-list holding the latter
    (layout in the module docstring). Idempotent: existing keys are kept."""
    root = private_dir(keys_dir)
    _create_pair(root, SERVER)
    _create_pair(root, WORKER)
    allowed = private_dir(root / ALLOWED)
    if not (allowed / f"{WORKER}.key").exists():
        shutil.copyfile(root / f"{WORKER}.key", allowed / f"{WORKER}.key")
    return root


def add_worker(keys_dir: str | os.PathLike, name: str, out_dir: str | os.PathLike) -> Path:
    """A key pair for one worker host: its public key joins the allow-list (taken at the next
    connection, no restart), and `out_dir` gets what that host's --keys-dir needs."""
    root = Path(keys_dir)
    server_public = root / f"{SERVER}.key"
    load_public(server_public)
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise KeysError(f"{name!r}: use letters, digits, '-', '_' or '.' for a key name")
    allowed = root / ALLOWED
    if (allowed / f"{name}.key").exists():
        raise KeysError(f"{allowed / (name + '.key')} exists: pick another name")
    out = private_dir(out_dir)
    if (out / f"{WORKER}.key_secret").exists():
        raise KeysError(f"{out / (WORKER + '.key_secret')} exists: pick an empty --out")
    _create_pair(out, WORKER)
    shutil.copyfile(server_public, out / f"{SERVER}.key")
    shutil.copyfile(out / f"{WORKER}.key", allowed / f"{name}.key")
    return out


# ---- sockets --------------------------------------------------------------------------------


def limit_frames(sock: zmq.Socket) -> None:
    """Both ends: refuse frames over MAX_FRAME_BYTES (the connection is dropped unread)."""
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)


def serve_curve(sock: zmq.Socket, keys: ServerKeys) -> None:
    """Make `sock` (before bind) a CURVE server whose clients the ZAP handler must admit; with
    ZAP_ENFORCE_DOMAIN a missing handler refuses every client instead of admitting all."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.pair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.pair.secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def connect_curve(sock: zmq.Socket, keys: WorkerKeys) -> None:
    """Make `sock` (before connect) a CURVE client of the scheduler whose public key it holds."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.pair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.pair.secret)


class AllowList:
    """The ZAP handler's credentials provider: a client is admitted when its public key is one
    of the allow-list's `*.key` files. The directory is read again when its mtime changes, so a
    key added (or removed) there counts from that worker's next connection, without a restart."""

    def __init__(self, allowed_dir: Path) -> None:
        self.allowed_dir = allowed_dir
        self._mtime = -1
        self._keys: frozenset[bytes] = frozenset()
        self.denied = 0  # connections refused, for stats and tests

    def callback(self, domain: str, key: bytes) -> bool:
        mtime = self.allowed_dir.stat().st_mtime_ns
        if mtime != self._mtime:
            self._keys, self._mtime = allowed_keys(self.allowed_dir), mtime
        if key in self._keys:
            return True
        self.denied += 1
        return False


def start_authenticator(ctx: zmq.Context, keys: ServerKeys) -> ThreadAuthenticator:
    """The ZAP handler of `ctx` (one per context), admitting the allow-list's keys. Start it
    before binding the server socket; `stop()` it before terminating the context."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("ecoserve.zap"))
    auth.start()
    auth.configure_curve_callback(ZAP_DOMAIN, AllowList(keys.allowed_dir))
    return auth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ecoserve_common.curve", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="create the scheduler's and the shared worker's keys")
    init.add_argument("keys_dir")
    add = sub.add_parser("add-worker", help="a key pair for one more worker host, allowed")
    add.add_argument("keys_dir")
    add.add_argument("name", help="the allow-list entry: workers/NAME.key")
    add.add_argument("--out", required=True, help="where that host's key files are written")
    a = p.parse_args(argv)
    try:
        if a.cmd == "init":
            print(f"worker-plane keys in {init_keys(a.keys_dir)}")
        else:
            out = add_worker(a.keys_dir, a.name, a.out)
            print(f"copy {out} to the worker host; point its --keys-dir there")
    except KeysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
