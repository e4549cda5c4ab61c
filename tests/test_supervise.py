"""`ecoserve up`'s Supervisor: a process that exits is started again, with backoff that doubles
on quick failures, resets after a stable run, and stops once the stack is stopping."""

from __future__ import annotations

import subprocess
import sys

from ecoserve_stack.supervise import Supervisor


class FakeProc:
    def __init__(self) -> None:
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def exit(self, code: int = 1) -> None:
        self.returncode = code

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.returncode = -sig

    def wait(self, timeout=None) -> int | None:
        return self.returncode


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make():
    clock, made = Clock(), []

    def popen(argv, env=None):
        made.append(FakeProc())
        return made[-1]

    sup = Supervisor(backoff_s=0.5, max_backoff_s=4.0, stable_s=60.0, clock=clock, popen=popen)
    return sup, clock, made


def test_a_dead_process_is_restarted_after_a_doubling_backoff():
    sup, clock, made = make()
    sup.start("worker-0", ["w"])
    assert sup.poll() == []
    delays = []
    for _ in range(5):
        made[-1].exit(1)
        assert sup.poll() == []  # exit noticed: due later, not now
        due = sup.services["worker-0"].next_start_s
        delays.append(due - clock.now)
        clock.now = due - 0.01
        assert sup.poll() == []  # never before its time
        clock.now = due
        assert sup.poll() == ["worker-0"]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]  # capped at max_backoff_s
    svc = sup.services["worker-0"]
    assert svc.restarts == 5 and svc.exits == [1] * 5 and sup.procs["worker-0"] is made[-1]


def test_a_process_that_ran_stably_restarts_fast_again():
    sup, clock, made = make()
    sup.start("w", ["w"])
    for _ in range(3):  # three quick crashes: the delay is up to 4 s
        made[-1].exit(1)
        sup.poll()
        clock.now = sup.services["w"].next_start_s
        sup.poll()
    clock.now += 61.0  # then it runs for a minute
    made[-1].exit(1)
    sup.poll()
    assert sup.services["w"].next_start_s - clock.now == 0.5


def test_nothing_restarts_once_stopping():
    sup, clock, made = make()
    sup.start("scheduler", ["s"])
    sup.start("worker-0", ["w"])
    sup.stop_all(grace_s=0.1)
    assert all(p.signals for p in made)  # both were sent SIGTERM
    clock.now += 100
    assert sup.poll() == [] and len(made) == 2 and sorted(sup.down()) == ["scheduler", "worker-0"]


def test_real_processes_are_restarted():
    """With real processes and the real clock: a process that exits at once is started again."""
    sup = Supervisor(backoff_s=0.0)
    sup.start("quick", [sys.executable, "-c", "raise SystemExit(3)"])
    first = sup.procs["quick"]
    first.wait(timeout=30)
    assert sup.poll() == ["quick"]  # exit noticed (code 3), due at once: started again
    assert sup.procs["quick"] is not first and sup.services["quick"].exits == [3]
    assert isinstance(sup.procs["quick"], subprocess.Popen)
    sup.stop_all(grace_s=5)
    assert sup.procs["quick"].poll() is not None
