"""CPU seconds of server processes from /proc (Linux): what bench-peer charges each process
for a phase, children included where a server runs its engine in a child (vLLM's engine core)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int, descendants: bool = True) -> float:
    """User + system CPU of a process and (by default) its live descendants (vLLM's engine core
    is a child)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / tick
        for child in children(pid) if descendants else ():
            total += cpu_seconds(child)
    except (FileNotFoundError, ProcessLookupError):
        pass  # gone between listing and reading
    return total


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (every thread's)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def process_cpu(pids: dict[str, int | tuple[int, bool]]) -> dict[str, float]:
    """cpu_seconds of each named process: a bare pid counts its descendants, (pid, False) only
    itself (where its children are named on their own)."""
    out = {}
    for name, proc in pids.items():
        pid, descendants = (proc, True) if isinstance(proc, int) else proc
        out[name] = cpu_seconds(pid, descendants)
    return out
