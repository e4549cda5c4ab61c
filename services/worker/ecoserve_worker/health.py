"""The worker's probe endpoint (`--health-address HOST:PORT`, off by default): what a container
orchestrator's probes read, since a worker otherwise listens on no port.

- `GET /livez`: 200 while the serving loop goes round: it did within `stall_s` (60 s). A step
  that runs longer than that (a hung device) turns it 503, and the orchestrator restarts the
  worker; the scheduler has dropped it as silent and recomputed its requests by then.
- `GET /readyz`: 200 while registered with the scheduler and not leaving; 503 while it
  registers (start-up, a restarted scheduler) or drains. In Kubernetes a rolling update waits
  for it before it replaces the next worker, and the PodDisruptionBudget counts it.

Both answer `WorkerServer.status()` as JSON (state, worker id, steps done, seconds since the
loop went round). Read-only: nothing sent here changes the worker (a drain starts from SIGTERM,
never from the network), so the port needs no key. One daemon thread serves it, a thread per
connection with a 5 s socket timeout, so a client that never finishes its request holds one
thread for 5 s, not the worker.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LIVE, READY = "/livez", "/readyz"
STALL_S = 60.0  # the loop not going round this long: not alive


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    status: Callable[[], dict[str, Any]]
    stall_s: float


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 5.0  # per connection: a half-sent request does not hold a thread for ever

    def do_GET(self) -> None:  # http.server's name for it
        status = self.server.status()
        if self.path == LIVE:
            ok = status["since_loop_s"] < self.server.stall_s
        elif self.path == READY:
            ok = status["state"] == "ready"
        else:
            self.send_error(404)
            return
        body = json.dumps(status).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a probe every few seconds is not worth a log line each


def serve_health(
    address: str, status: Callable[[], dict[str, Any]], stall_s: float = STALL_S
) -> ThreadingHTTPServer:
    """Serve the probes at `address` (HOST:PORT; port 0 picks one: `server_address[1]`) from a
    daemon thread; OSError when it cannot be bound. `status` is `WorkerServer.status`."""
    host, _, port = address.rpartition(":")
    server = _Server((host or "0.0.0.0", int(port)), _Handler)
    server.status = status
    server.stall_s = stall_s
    threading.Thread(target=server.serve_forever, name="worker-health", daemon=True).start()
    return server
