"""What this CPU is: its model name and feature flags, read once from /proc/cpuinfo (the first
CPU's entry). The dtype default, the kernel's build name, the profile cache key and the benches
all describe the machine through these two."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path


def _first_cpu(cpuinfo: str) -> dict[str, str]:
    entry: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if entry:
                break  # the first CPU's entry is enough
            continue
        key, _, value = line.partition(":")
        entry.setdefault(key.strip(), value.strip())
    return entry


@cache
def _read() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so the safe defaults
        return ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first CPU (empty where there are none)."""
    entry = _first_cpu(_read() if cpuinfo is None else cpuinfo)
    return frozenset((entry.get("flags") or entry.get("Features") or "").split())


def cpu_model(cpuinfo: str | None = None) -> str:
    """The first CPU's model name, else what `platform` knows."""
    entry = _first_cpu(_read() if cpuinfo is None else cpuinfo)
    return entry.get("model name") or platform.processor() or platform.machine() or "unknown"
