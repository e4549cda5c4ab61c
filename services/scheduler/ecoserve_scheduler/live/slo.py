"""Latency SLOs of live requests: the server's classes, what a request asks for, what the core
gets, and whether the request met it.

A request asks in one of two ways, over both APIs (HTTP: the body's `ecoserve` object; gRPC:
GenerateRequest's `slo_class`, `ttft_ms`, `tpot_ms`, `deadline_ms`):

- a class the server configures (`slo_class`; settings `slo_classes`): it gets that class's
  targets;
- explicit targets in milliseconds (`ttft_ms`, `tpot_ms`, `deadline_ms`), which override the
  named class's (a request that names no class gets only its explicit targets, labelled
  "custom").

A request that asks for neither gets `default_slo_class` (none when that setting is empty).
Each value is an integer in [1, MAX_SLO_MS]; a class must be one the server configures. A bad
one is InvalidSlo (an InvalidSampling: every edge names the field, HTTP as `ecoserve.<field>`).

The core takes `SLO(jct_deadline_s, ttft_s, tpot_s)` with an absolute deadline on its own clock
and reads only the deadline (slack ordering, the SLO guard). A request with TTFT and TPOT
targets but no deadline gets the deadline they imply for its predicted length n:
received + ttft + tpot x (n - 1), the simulator's rule (sim/engine.py) with the predicted length
in place of the true one; an explicit `deadline_ms` bounds it. A TTFT-only or TPOT-only SLO
implies no deadline (infinite, as in the simulator), so the core does not order by it.

Met, as the server sees it (`SloTargets.misses`): the request ended "stop" or "length", its
first token came within `ttft` of its arrival at the edge, its mean time per output token after
the first is within `tpot` (when it has more than one), and its last token within `deadline`.
A failed request missed. A request the client aborted (it left, or its deadline passed) is not
counted. `SloLedger` counts per class: requests, met, and misses by target; the label takes only
configured class names and "custom", so its cardinality is bounded by the configuration.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ecoserve_common.sampling import InvalidSampling

from ..core.request import SLO

INF = math.inf
MAX_SLO_MS = 86_400_000  # one day: far past any latency target, well within uint32
CUSTOM = "custom"  # the label of a request with explicit targets and no class
FIELDS = ("ttft_ms", "tpot_ms", "deadline_ms")
MISSES = ("ttft", "tpot", "deadline", "failed")  # a miss's `target` label
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")

# The classes a server has unless configured otherwise (settings `slo_classes`): interactive
# and standard differ in TTFT; standard is the SLO bench-peer judges by (TTFT 2 s, TPOT 0.2 s).
DEFAULT_SLO_CLASSES = (
    '{"interactive": {"ttft_ms": 1000, "tpot_ms": 200}, '
    '"standard": {"ttft_ms": 2000, "tpot_ms": 200}, '
    '"batch": {"ttft_ms": 20000, "tpot_ms": 1000}}'
)
DEFAULT_SLO_CLASS = "standard"


class InvalidSlo(InvalidSampling):
    """An SLO field out of range or an unknown class; `field` names it (`slo_class`,
    `ttft_ms`, `tpot_ms`, `deadline_ms`). An InvalidSampling, so every edge that names a bad
    request field names this one too."""


@dataclass(frozen=True)
class SloAsk:
    """What a request asked for, as the edge received it (None: not given)."""

    slo_class: str | None = None
    ttft_ms: int | None = None
    tpot_ms: int | None = None
    deadline_ms: int | None = None


@dataclass(frozen=True)
class SloTargets:
    """Targets in seconds, relative to the request's arrival (None: no target)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    deadline_s: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.deadline_s is None

    def implied_deadline_s(self, outputs: int) -> float:
        """The JCT bound (relative) for a request of `outputs` tokens: the explicit deadline,
        or the one TTFT + TPOT x (outputs - 1) imply, whichever is tighter; INF without."""
        implied = INF if self.ttft_s is None else self.ttft_s
        if outputs > 1:
            implied += (INF if self.tpot_s is None else self.tpot_s) * (outputs - 1)
        return min(implied, INF if self.deadline_s is None else self.deadline_s)

    def core_slo(self, received_s: float, predicted_outputs: int) -> SLO:
        """The core's SLO: absolute deadline on the clock of `received_s`."""
        deadline = self.implied_deadline_s(max(1, predicted_outputs))
        return SLO(received_s + deadline, self.ttft_s, self.tpot_s)

    def misses(self, ttft: float | None, tpot: float | None, jct: float) -> tuple[str, ...]:
        """The targets a finished request missed (empty: it met its SLO). `ttft` None: no
        token came; `tpot` None: one token only (no TPOT to judge)."""
        out = []
        if self.ttft_s is not None and (ttft is None or ttft > self.ttft_s):
            out.append("ttft")
        if self.tpot_s is not None and tpot is not None and tpot > self.tpot_s:
            out.append("tpot")
        if self.deadline_s is not None and jct > self.deadline_s:
            out.append("deadline")
        return tuple(out)

    def as_dict(self) -> dict[str, float]:
        pairs = (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s), ("deadline_s", self.deadline_s))
        return {k: v for k, v in pairs if v is not None}


@dataclass(frozen=True)
class RequestSlo:
    """A request's SLO: its class label (a configured name, or CUSTOM) and its targets."""

    slo_class: str
    targets: SloTargets


def _ms(field: str, value: object, where: str = "") -> float | None:
    """A target in ms (None / absent: none) as seconds; InvalidSlo when not an integer in
    [1, MAX_SLO_MS]."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidSlo(field, f"{where}{field} must be an integer number of milliseconds")
    if not 1 <= value <= MAX_SLO_MS:
        raise InvalidSlo(field, f"{where}{field} must be in [1, {MAX_SLO_MS}] ms (got {value})")
    return value / 1000.0


class SloClasses:
    """The server's SLO classes (name -> targets) and the class of a request that asks for
    none (`default`, "" for none)."""

    def __init__(self, table: Mapping[str, SloTargets] | None = None, default: str = "") -> None:
        self.table = dict(table or {})
        for name, targets in self.table.items():
            if not _NAME.match(name) or name == CUSTOM:
                raise ValueError(
                    f"SLO class name {name!r}: 1-32 letters, digits, '_', '.', '-', not {CUSTOM!r}"
                )
            if targets.empty:
                raise ValueError(f"SLO class {name!r} has no target")
        if default and default not in self.table:
            raise ValueError(
                f"default SLO class {default!r} is not one of the classes ({self.names_text()})"
            )
        self.default = default

    @classmethod
    def parse(cls, spec: str, default: str = "") -> SloClasses:
        """From settings: a JSON object {name: {"ttft_ms": int, "tpot_ms": int,
        "deadline_ms": int}} (each key optional, at least one); ValueError saying what is
        wrong."""
        try:
            raw = json.loads(spec) if spec.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError('a JSON object {"name": {"ttft_ms": 1000, "tpot_ms": 200}, ...}')
        table = {}
        for name, targets in raw.items():
            if not isinstance(targets, dict):
                raise ValueError(f"class {name!r}: an object of ttft_ms / tpot_ms / deadline_ms")
            unknown = set(targets) - set(FIELDS)
            if unknown:
                raise ValueError(f"class {name!r}: unknown keys {sorted(unknown)} (use {FIELDS})")
            try:
                table[name] = SloTargets(
                    *(_ms(f, targets.get(f), f"class {name!r}: ") for f in FIELDS)
                )
            except InvalidSlo as exc:
                raise ValueError(exc.message) from None
        return cls(table, default)

    @property
    def names(self) -> list[str]:
        """Every label a request's SLO may carry: the classes, then CUSTOM."""
        return [*self.table, CUSTOM]

    def names_text(self) -> str:
        return ", ".join(self.table) or "none configured"

    def resolve(self, ask: SloAsk) -> RequestSlo | None:
        """A request's SLO (None: it has none); InvalidSlo naming the field at fault."""
        explicit = [_ms(f, getattr(ask, f)) for f in FIELDS]
        name = ask.slo_class
        if name is not None and not isinstance(name, str):
            raise InvalidSlo("slo_class", "slo_class must be a string")
        if name:
            base = self.table.get(name)
            if base is None:
                shown = name if len(name) <= 40 else name[:37] + "..."
                raise InvalidSlo(
                    "slo_class",
                    f"slo_class {shown!r} is not an SLO class of this server ({self.names_text()})",
                )
        elif any(v is not None for v in explicit):
            name, base = CUSTOM, SloTargets()
        elif self.default:
            name, base = self.default, self.table[self.default]
        else:
            return None
        ttft, tpot, deadline = (
            e if e is not None else b
            for e, b in zip(explicit, (base.ttft_s, base.tpot_s, base.deadline_s), strict=True)
        )
        return RequestSlo(name, SloTargets(ttft, tpot, deadline))

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {name: t.as_dict() for name, t in self.table.items()}


class SloLedger:
    """Per SLO class: requests that ended with an SLO (not aborted), those that met it, and the
    misses by target (a request may miss several). Thread-safe: gRPC threads and the HTTP event
    loop record ends."""

    def __init__(self, names: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._names = list(names)
        self._rows = {n: self._zero() for n in self._names}

    @staticmethod
    def _zero() -> dict[str, int]:
        return {"requests": 0, "met": 0, **{f"missed_{m}": 0 for m in MISSES}}

    def record(self, slo_class: str, missed: tuple[str, ...]) -> None:
        with self._lock:
            # a name not configured never makes a new label: it counts as custom
            row = self._rows.get(slo_class) or self._rows.get(CUSTOM)
            if row is None:
                return
            row["requests"] += 1
            if not missed:
                row["met"] += 1
            for m in missed:
                row[f"missed_{m}"] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {n: dict(row) for n, row in self._rows.items()}


__all__ = [
    "CUSTOM",
    "DEFAULT_SLO_CLASS",
    "DEFAULT_SLO_CLASSES",
    "MAX_SLO_MS",
    "InvalidSlo",
    "RequestSlo",
    "SloAsk",
    "SloClasses",
    "SloLedger",
    "SloTargets",
]
