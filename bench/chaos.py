"""Chaos: `ecoserve up` under load while its parts fail; no accepted request may be lost.

    python bench/chaos.py [--model tiny] [--workers 2] [--rate 4] [--duration 40] \\
        [--out results/chaos]

Starts `ecoserve up` as a user would (a subprocess, its own --home), sends streaming chat
requests as Poisson arrivals for `--duration` seconds, and on a fixed timeline:

- t = 20% of the run: kill -9 of one worker (the launcher must restart it);
- t = 40%: a store outage of `--outage-s` seconds (another connection holds SQLite's write
  lock: every store write gets "database is locked" until it lets go);
- t = 60%: a client storm: `--storm` requests at once, half of them hung up mid-stream;
- t = 80%: kill -9 of the other worker.

Each request the server accepted (HTTP 200) must end, for its client, finished (stop /
length), failed with a reason (finish_reason "error"), or cancelled (the client hung up); a
refused one (429 / 503) is counted with its status. `lost` counts accepted requests whose
stream ended without a finish, and store rows not terminal after the drain (queued / running).
OUT/summary.json holds the counts, the timeline and the command; `lost` must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_measure import children  # noqa: E402

TERMINAL = ("finished", "failed", "aborted")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_up(a, home: Path) -> tuple[subprocess.Popen, str]:
    http = free_port()
    cmd = [sys.executable, "-m", "ecoserve_stack.cli", "up", "--model", a.model]
    cmd += ["--workers", str(a.workers), "--home", str(home), "--num-blocks", "256"]
    cmd += ["--http-port", str(http), "--grpc-port", str(free_port()), "--token-budget", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:  # the launcher prints "ready" once every worker registered
        if line.startswith("ready"):
            return proc, f"http://127.0.0.1:{http}"
    raise RuntimeError(f"ecoserve up exited ({proc.wait()}) before it was ready")


def workers_of(launcher: int) -> list[int]:
    """Worker processes under the launcher (their command line names ecoserve_worker)."""
    out = []
    for pid in children(launcher):
        try:
            if b"ecoserve_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass  # gone since it was listed
    return sorted(out)


async def one_request(client: httpx.AsyncClient, base: str, i: int, hang_up: bool) -> str:
    """The request's outcome: finished, failed, cancelled, refused_<status>, or lost."""
    body = {
        "messages": [{"role": "user", "content": f"Tell me about chaos number {i}."}],
        "max_tokens": 24,
        "stream": True,
        "ignore_eos": True,
    }
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return f"refused_{r.status_code}"
            finish = None
            async for line in r.aiter_lines():
                if hang_up:
                    return "cancelled"  # closing the stream hangs up mid-request
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return "failed"
                for choice in chunk.get("choices", []):
                    finish = choice.get("finish_reason") or finish
            if finish in ("stop", "length"):
                return "finished"
            return "failed" if finish == "error" else "lost"
    except (httpx.TransportError, httpx.StreamError):
        return "lost" if not hang_up else "cancelled"


def store_outage(db: Path, seconds: float) -> None:
    """Hold SQLite's write lock for `seconds`: every other writer is refused meanwhile."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)  # the outage itself, not a measurement
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def run(a, base: str, launcher: subprocess.Popen, db: Path) -> dict:
    rng = random.Random(a.seed)
    outcomes: Counter = Counter()
    timeline: list[dict] = []
    t0 = time.monotonic()
    tasks: list[asyncio.Task] = []

    def mark(what: str) -> None:
        timeline.append({"t_s": round(time.monotonic() - t0, 2), "event": what})

    async def chaos() -> None:
        d = a.duration
        await asyncio.sleep(0.2 * d)
        ws = workers_of(launcher.pid)
        os.kill(ws[0], signal.SIGKILL)
        mark(f"kill -9 worker pid {ws[0]}")
        await asyncio.sleep(0.2 * d)
        mark(f"store outage {a.outage_s}s")
        await asyncio.to_thread(store_outage, db, a.outage_s)
        mark("store back")
        await asyncio.sleep(max(0.0, 0.6 * d - (time.monotonic() - t0)))
        mark(f"client storm: {a.storm} requests, half hang up")
        for i in range(a.storm):
            tasks.append(asyncio.ensure_future(one_request(client, base, 10**6 + i, i % 2 == 1)))
        await asyncio.sleep(max(0.0, 0.8 * d - (time.monotonic() - t0)))
        ws = workers_of(launcher.pid)
        os.kill(ws[-1], signal.SIGKILL)
        mark(f"kill -9 worker pid {ws[-1]}")

    limits = httpx.Limits(max_connections=a.storm + 256)
    async with httpx.AsyncClient(timeout=a.request_timeout_s, limits=limits) as client:
        chaos_task = asyncio.ensure_future(chaos())
        i = 0
        while time.monotonic() - t0 < a.duration:
            tasks.append(asyncio.ensure_future(one_request(client, base, i, False)))
            i += 1
            await asyncio.sleep(rng.expovariate(a.rate))
        await chaos_task
        for outcome in await asyncio.gather(*tasks):
            outcomes[outcome] += 1
    mark("all clients done")
    return {"outcomes": dict(outcomes), "timeline": timeline, "sent": len(tasks)}


def store_rows(db: Path) -> dict[str, int]:
    with sqlite3.connect(db, timeout=30) as conn:
        return dict(conn.execute("SELECT status, COUNT(*) FROM served_requests GROUP BY status"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rate", type=float, default=4.0, help="requests/s (Poisson)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of load")
    p.add_argument("--outage-s", type=float, default=5.0)
    p.add_argument("--storm", type=int, default=100)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/chaos")
    a = p.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="ecoserve-chaos-"))
    launcher, base = start_up(a, home)
    try:
        result = asyncio.run(run(a, base, launcher, home / "ecoserve.db"))
        stats = httpx.get(f"{base}/stats", timeout=10).json()
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(60)
    rows = store_rows(home / "ecoserve.db")  # after shutdown: the writer has flushed
    out = result["outcomes"]
    accepted = sum(v for k, v in out.items() if not k.startswith("refused"))
    summary = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"cores": os.cpu_count()},
        "setup": vars(a),
        "sent": result["sent"],
        "accepted": accepted,
        "finished": out.get("finished", 0),
        "failed_with_reason": out.get("failed", 0),
        "cancelled": out.get("cancelled", 0),
        "refused": {k: v for k, v in out.items() if k.startswith("refused")},
        "lost_streams": out.get("lost", 0),
        "store_rows": rows,
        "store_rows_not_terminal": sum(v for k, v in rows.items() if k not in TERMINAL),
        "store_writer": stats.get("store"),
        "workers_dropped": stats.get("engine", {}).get("workers_dropped"),
        "timeline": result["timeline"],
    }
    summary["lost"] = summary["lost_streams"] + summary["store_rows_not_terminal"]
    target = Path(a.out)
    target.mkdir(parents=True, exist_ok=True)
    (target / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if summary["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
