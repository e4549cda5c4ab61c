"""Trace records and user trace files: the one trace format every workload yields.

A trace is a list of `TraceRecord`s sorted by arrival. `load_trace_file` and
`save_trace_file` read and write it as CSV or JSONL; `sim.workload` builds traces from the real
data sets and re-exports everything here.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


@dataclass(frozen=True)
class TraceRecord:
    """One request: when it arrives and how long its prompt and its response are (tokens)."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    slo_jct_s: float | None = None
    prompt_text: str | None = None
    alpaca_row: int | None = None


class LengthSample(NamedTuple):
    """Request lengths without an arrival time; `prompt_text` is the last human message only."""

    prompt_tokens: int
    output_tokens: int
    prompt_text: str | None = None


class DataMissing(FileNotFoundError):
    """A real-data file is not where we looked; tests and tools skip or fall back on this."""


def cap_lengths(inp: int, out: int, max_context: int) -> tuple[int, int]:
    """Fit a request into `max_context` tokens, shortening the input first.

    The output keeps its length unless it exceeds both the room the input leaves and
    max_context // 2; then the input is cut to what is left (at least 1 token). Requests that
    already fit are unchanged. Result: inp + out <= max_context, inp >= 1, out >= 1.
    """
    if max_context < 2:
        raise ValueError(f"max_context must be >= 2, got {max_context}")
    out = min(out, max(max_context - inp, max_context // 2))
    return min(inp, max_context - out), out


def mean_rate(records: list[TraceRecord]) -> float:
    """Requests per second over the span of a trace: (n - 1) / (last - first arrival)."""
    span = records[-1].arrival_s - records[0].arrival_s if records else 0.0
    return (len(records) - 1) / span if span > 0 else math.inf


# ---- user trace files (CSV or JSONL with the TraceRecord columns) ----

_FIELDS = [f.name for f in dataclasses.fields(TraceRecord)]
_REQUIRED = ("arrival_s", "prompt_tokens", "output_tokens")


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".json", ".ndjson")


def _as_int(value: object, name: str, minimum: int) -> int:
    number = float(value)  # accepts "12", 12 and 12.0; rejects "abc"
    if not number.is_integer() or number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(number)


def _record_from(row: dict, where: str) -> TraceRecord:
    """Validate one row (dict of column -> value, '' or None meaning absent)."""
    try:
        missing = [c for c in _REQUIRED if row.get(c) in (None, "")]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        arrival = float(row["arrival_s"])
        if not math.isfinite(arrival) or arrival < 0:
            raise ValueError(f"arrival_s must be finite and >= 0, got {row['arrival_s']!r}")
        slo = row.get("slo_jct_s")
        slo = None if slo in (None, "") else float(slo)
        if slo is not None and not slo > 0:
            raise ValueError(f"slo_jct_s must be > 0, got {row['slo_jct_s']!r}")
        alpaca = row.get("alpaca_row")
        return TraceRecord(
            arrival_s=arrival,
            prompt_tokens=_as_int(row["prompt_tokens"], "prompt_tokens", 1),
            output_tokens=_as_int(row["output_tokens"], "output_tokens", 1),
            slo_jct_s=slo,
            prompt_text=row.get("prompt_text") or None,
            alpaca_row=None if alpaca in (None, "") else _as_int(alpaca, "alpaca_row", 0),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad trace row: {exc}") from None


def load_trace_file(path: str | Path) -> list[TraceRecord]:
    """Read a user's trace (.csv, or .jsonl/.json one object per line); sorted by arrival.

    Empty cells or nulls mean "absent" (an empty prompt_text reads back as None). A bad row
    raises ValueError naming the file and line.
    """
    path = Path(path)
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        if _is_jsonl(path):
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {lineno}: bad JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {lineno}: expected a JSON object")
                records.append(_record_from(row, f"{path}: line {lineno}"))
        else:
            reader = csv.DictReader(f)
            absent = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
            if absent:
                raise ValueError(f"{path}: line 1: header lacks column(s) {', '.join(absent)}")
            for row in reader:
                records.append(_record_from(row, f"{path}: line {reader.line_num}"))
    return sorted(records, key=lambda r: r.arrival_s)


def save_trace_file(records: list[TraceRecord], path: str | Path) -> None:
    """Write records as CSV or JSONL (by suffix) so `load_trace_file` reads them back exactly."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        if _is_jsonl(path):
            for r in records:
                f.write(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n")
        else:
            writer = csv.writer(f)
            writer.writerow(_FIELDS)
            for r in records:
                writer.writerow(["" if v is None else v for v in dataclasses.astuple(r)])
