"""Keep a launch's processes running: start each, restart any that exits, with backoff.

`ecoserve up` used to stop the whole stack when one worker died. A `Supervisor` instead starts
the process again after `backoff_s`, doubling on each quick failure up to `max_backoff_s`; a
process that ran `stable_s` before exiting starts from the short delay again (so a crash loop
slows down, a rare crash is repaired fast). The scheduler marks a dead worker's requests for
recompute on the others and the restarted worker registers again; a restarted scheduler fails
the rows its predecessor left unfinished, and workers re-register with it.

The clock and process factory are injectable, so tests drive restarts without sleeping.
Invariant: `poll` never starts a process before its `next_start`, and nothing starts after
`stop_all`.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("ecoserve.up")


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    started_s: float = 0.0
    delay_s: float = 0.0  # the wait before the next restart
    next_start_s: float | None = None  # when a dead process is due to start again
    restarts: int = 0
    exits: list[int] = field(default_factory=list)  # exit codes seen, oldest first


class Supervisor:
    def __init__(
        self,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        stable_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        popen: Callable[..., subprocess.Popen] | None = None,
    ) -> None:
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self.clock, self._popen = clock, popen
        self.services: dict[str, Service] = {}
        self.stopping = False

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        """The current process of each service (the last one, if it is down), in start order."""
        return {n: s.proc for n, s in self.services.items() if s.proc is not None}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
        service = Service(name, argv, env, delay_s=self.backoff_s)
        self.services[name] = service
        self._spawn(service)
        return service

    def poll(self) -> list[str]:
        """Notice exits and restart what is due; the names (re)started by this call."""
        now = self.clock()
        started = []
        for s in self.services.values():
            if self.stopping or s.proc is None:
                continue
            if s.next_start_s is None and s.proc.poll() is not None:
                code = s.proc.returncode
                s.exits.append(code)
                if now - s.started_s >= self.stable_s:
                    s.delay_s = self.backoff_s  # it had been fine: repair fast
                s.next_start_s = now + s.delay_s
                log.error("%s exited (code %s): restarting in %.1fs", s.name, code, s.delay_s)
                s.delay_s = min(self.max_backoff_s, 2 * s.delay_s)
            if s.next_start_s is not None and now >= s.next_start_s:
                s.restarts += 1
                self._spawn(s)
                started.append(s.name)
        return started

    def down(self) -> list[str]:
        """Services whose process is not running now."""
        return [n for n, s in self.services.items() if s.proc is None or s.proc.poll() is not None]

    def stop_all(self, grace_s: float) -> None:
        """SIGTERM in reverse start order (workers first), then SIGKILL what outlives the grace.
        Nothing is restarted after this."""
        self.stopping = True
        stop_procs(self.procs, grace_s)

    def _spawn(self, s: Service) -> None:
        popen = self._popen or subprocess.Popen  # looked up now: tests may patch it
        s.proc = popen(s.argv, env=s.env)
        s.started_s = self.clock()
        s.next_start_s = None


def stop_procs(procs: dict[str, subprocess.Popen], grace_s: float) -> None:
    """SIGTERM in reverse order, then SIGKILL whatever outlives `grace_s`."""
    for p in reversed(list(procs.values())):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for name, p in reversed(list(procs.items())):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs: killed", name, grace_s)
            p.kill()
            p.wait()
