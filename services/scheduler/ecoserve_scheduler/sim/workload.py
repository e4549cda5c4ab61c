"""Workloads for the simulator: adapters from the real data sets onto one trace format.

Every loader yields `TraceRecord`s (`sim.trace`, re-exported here with the trace-file reader and
writer) sorted by arrival. Real data is read at run time from
`../shared/data` (or `$ECOSERVE_DATA_DIR`); a missing file raises `DataMissing` so callers can
skip cleanly. Randomness comes only from the seed: the same seed gives the same workload.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from .trace import (
    DataMissing,
    LengthSample,
    TraceRecord,
    cap_lengths,
    load_trace_file,
    mean_rate,
    save_trace_file,
)
from .workload_long import LONG_WORKLOADS, long_workload_samples

__all__ = [
    "ALPACA_COLUMNS",
    "ALPACA_FILE",
    "AZURE_CONV_FILE",
    "SHAREGPT_FILE",
    "WORKLOADS",
    "AlpacaLengths",
    "DataMissing",
    "LONG_WORKLOADS",
    "LengthSample",
    "TraceRecord",
    "build_workload",
    "cap_lengths",
    "data_dir",
    "gamma_arrivals",
    "load_alpaca_lengths",
    "load_azure_conv",
    "load_sharegpt",
    "load_trace_file",
    "mean_rate",
    "poisson_arrivals",
    "save_trace_file",
    "synthetic_sharegpt_like",
]

DEFAULT_DATA_DIR = Path("../shared/data")
SHAREGPT_FILE = "sharegpt_v3_pairs.jsonl.gz"
AZURE_CONV_FILE = "AzureLLMInferenceTrace_conv.csv"
ALPACA_FILE = "alpaca_vicuna7b_response_lengths.csv"
ALPACA_COLUMNS = ("len_t0.0", "len_t0.3", "len_t0.5", "len_t0.7", "len_alpaca_ref")
# The long ShareGPT workloads (sharegpt_long, sharegpt_multiturn) are built in workload_long.py.
WORKLOADS = ("sharegpt", "azure_conv", "alpaca", "synthetic", *LONG_WORKLOADS)

# Length quantiles (cl100k tokens) of the real ShareGPT pairs in ../shared/data (54,579 rows),
# after cap_lengths(..., 4096), numpy linear percentiles. Computed once with this module's loader;
# the raw response column gives mean 279.8 / median 255 / p90 548 / p99 769 (data README, sect. 3).
# "input" is history+prompt (mean 791), "prompt" the last human message alone (mean 80).
SHAREGPT_LENGTH_QUANTILES = {
    "percent": (0, 1, 2.5, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90,
                95, 97.5, 99, 99.5, 99.9, 100),
    "input": (1, 5, 9, 14, 36, 111, 214, 300, 376, 459, 546, 633, 724, 805, 908, 1019, 1130, 1249,
              1367, 1493, 1619, 1764, 1853, 1943, 2031, 3471, 4095),
    "response": (1, 3, 11, 24, 50, 82, 109, 135, 161, 187, 211, 234, 256, 278, 300, 322, 349, 379,
                 420, 472, 547, 674, 767, 769, 770, 803, 4086),
    "prompt": (1, 1, 1, 3, 5, 7, 8, 9, 11, 12, 14, 16, 18, 20, 24, 28, 34, 43, 57, 79, 134, 332,
               676, 1307, 1946, 3471, 4095),
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class AlpacaLengths:
    """Vicuna-7B response lengths per Alpaca prompt; `data["len_t0.7"]` gives a column."""

    alpaca_id: np.ndarray
    columns: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __len__(self) -> int:
        return len(self.alpaca_id)


def data_dir(path: str | Path | None = None) -> Path:
    """Resolve the data folder: explicit path, else $ECOSERVE_DATA_DIR, else ../shared/data."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("ECOSERVE_DATA_DIR") or DEFAULT_DATA_DIR)


data_dir_path = data_dir  # alias for functions whose `data_dir` parameter shadows the helper


def _data_file(directory: str | Path | None, name: str) -> Path:
    folder = data_dir(directory)
    path = folder / name
    if not path.is_file():
        raise DataMissing(f"{folder} absent: {path} not found (pass data_dir or ECOSERVE_DATA_DIR)")
    return path


@lru_cache(maxsize=4)
def _sharegpt_columns(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Parse the 25 MB gzip once per process: (prompt, history, response tokens, prompt texts)."""
    prompt, history, response, texts = [], [], [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            prompt.append(row["prompt_tokens"])
            history.append(row["history_tokens"])
            response.append(row["response_tokens"])
            texts.append(row["prompt"])
    cols = [np.asarray(c, dtype=np.int64) for c in (prompt, history, response)]
    for c in cols:
        c.flags.writeable = False
    return cols[0], cols[1], cols[2], tuple(texts)


def load_sharegpt(
    data_dir: str | Path | None,
    n: int,
    rng_seed: int,
    max_context: int = 4096,
    input_mode: str = "history+prompt",
) -> list[LengthSample]:
    """Draw `n` ShareGPT (input, output, prompt text) samples, seeded.

    input = history_tokens + prompt_tokens ("history+prompt": what a stateless chat API sees) or
    prompt_tokens ("prompt"). Rows with 0 input or 0 output are dropped, the rest are capped with
    `cap_lengths`. Rows are drawn without replacement while n <= rows available, else with.
    """
    if input_mode not in ("history+prompt", "prompt"):
        raise ValueError(f"input_mode must be 'history+prompt' or 'prompt', got {input_mode!r}")
    prompt, history, response, texts = _sharegpt_columns(_data_file(data_dir, SHAREGPT_FILE))
    inp = prompt + history if input_mode == "history+prompt" else prompt
    valid = np.flatnonzero((inp > 0) & (response > 0))
    rng = np.random.default_rng(rng_seed)
    rows = rng.choice(valid, size=n, replace=n > len(valid))
    samples = []
    for row in rows.tolist():
        p, o = cap_lengths(int(inp[row]), int(response[row]), max_context)
        samples.append(LengthSample(p, o, texts[row]))
    return samples


def _parse_timestamp(text: str) -> tuple[datetime, float]:
    """Split 'YYYY-MM-DD HH:MM:SS.fffffff' into whole seconds and a fraction of any precision."""
    whole, _, frac = text.strip().partition(".")
    return datetime.fromisoformat(whole), float(f"0.{frac}") if frac else 0.0


@lru_cache(maxsize=4)
def _azure_columns(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds since the first row, context tokens, generated tokens) of an Azure trace CSV."""
    times, inp, out = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            times.append(_parse_timestamp(row["TIMESTAMP"]))
            inp.append(int(row["ContextTokens"]))
            out.append(int(row["GeneratedTokens"]))
    t0, f0 = times[0]
    secs = np.array([(t - t0).total_seconds() + (fr - f0) for t, fr in times])
    return secs, np.asarray(inp, dtype=np.int64), np.asarray(out, dtype=np.int64)


def load_azure_conv(
    data_dir: str | Path | None,
    max_context: int = 4096,
    time_scale: float = 1.0,
    limit: int | None = None,
    start_offset_s: float = 0.0,
) -> list[TraceRecord]:
    """The Azure 2023 conversation trace with its real arrival times.

    Rows at or after `start_offset_s` (trace seconds) are kept, up to `limit`; arrival =
    (t - start_offset_s) / time_scale, so time_scale=2 doubles the rate. Rows with 0 tokens on
    either side are dropped; lengths are capped with `cap_lengths`.
    """
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    secs, inp, out = _azure_columns(_data_file(data_dir, AZURE_CONV_FILE))
    keep = np.flatnonzero((secs >= start_offset_s) & (inp > 0) & (out > 0))[:limit]
    records = []
    for row in keep.tolist():
        p, o = cap_lengths(int(inp[row]), int(out[row]), max_context)
        records.append(TraceRecord(float(secs[row] - start_offset_s) / time_scale, p, o))
    return records


@lru_cache(maxsize=4)
def _alpaca_cached(path: Path) -> AlpacaLengths:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    ids = np.array([int(r["alpaca_id"]) for r in rows], dtype=np.int64)
    cols = {c: np.array([int(r[c]) for r in rows], dtype=np.int64) for c in ALPACA_COLUMNS}
    for arr in (ids, *cols.values()):
        arr.flags.writeable = False
    return AlpacaLengths(ids, cols)


def load_alpaca_lengths(data_dir: str | Path | None = None) -> AlpacaLengths:
    """Per-prompt Vicuna-7B lengths at 4 temperatures plus the reference (20,000 rows, cached)."""
    return _alpaca_cached(_data_file(data_dir, ALPACA_FILE))


def poisson_arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process at `rate` req/s; the first request arrives at 0."""
    return gamma_arrivals(n, rate, 1.0, rng)


def gamma_arrivals(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Renewal process with Gamma gaps of mean 1/rate and coefficient of variation `cv`.

    cv > 1 is burstier than Poisson (cv = 1 is Poisson). The first request arrives at 0, so the
    mean rate (n - 1) / last arrival is `rate` in expectation.
    """
    if rate <= 0 or cv <= 0:
        raise ValueError(f"rate and cv must be > 0, got rate={rate}, cv={cv}")
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (shape * rate), size=max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:n]


def _draw_quantiles(column: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Inverse-CDF sampling, linear between the stored ShareGPT percentiles."""
    q = SHAREGPT_LENGTH_QUANTILES
    values = np.interp(rng.random(n) * 100.0, q["percent"], q[column])
    return np.maximum(1, np.rint(values)).astype(np.int64)


def synthetic_sharegpt_like(n: int, rng: np.random.Generator) -> list[LengthSample]:
    """Lengths with ShareGPT's marginals (history+prompt input, response), drawn independently.

    The real log lengths correlate weakly (0.13); that correlation is ignored here.
    """
    inp, out = _draw_quantiles("input", n, rng), _draw_quantiles("response", n, rng)
    return [LengthSample(int(p), int(o)) for p, o in zip(inp, out, strict=True)]


def build_workload(
    name: str,
    rate: float | None,
    n: int | None,
    seed: int,
    data_dir: str | Path | None = None,
    arrival: str = "poisson",
    cv: float = 2.0,
    max_context: int = 4096,
    *,
    fallback: bool = False,
) -> tuple[list[TraceRecord], str]:
    """Build a named workload; returns (records, a human string saying what was used).

    Lengths and arrivals use separate streams derived from `seed`, so a rate sweep keeps the
    same request lengths. "azure_conv" keeps its real timestamps, rescaled so that the first n
    records arrive at `rate` on average (rate None: as recorded; n None: the whole trace);
    `arrival` and `cv` do not apply to it. With `fallback`, a missing ShareGPT file gives the
    synthetic ShareGPT-like workload instead of DataMissing, and `source` says so; the long
    ShareGPT workloads (sim/workload_long.py) have no fallback and always raise DataMissing.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
    if name == "azure_conv":
        return _azure_workload(rate, n, data_dir, max_context)
    if n is None or rate is None:
        raise ValueError(f"workload {name!r} needs n and rate")
    length_rng = np.random.default_rng([seed, 1])
    rows: list[int | None] = [None] * n
    if name == "sharegpt":
        samples, lengths = _sharegpt_or_fallback(n, seed, data_dir, max_context, fallback)
    elif name == "alpaca":
        samples, rows, lengths = _alpaca_lengths(n, length_rng, data_dir, max_context)
    elif name in LONG_WORKLOADS:
        path = _data_file(data_dir, SHAREGPT_FILE)
        samples, lengths = long_workload_samples(name, path, n, length_rng, max_context)
    else:
        samples = _synthetic(n, length_rng, max_context)
        lengths = "synthetic (ShareGPT-like lengths)"
    times, arrivals = _arrivals(n, rate, arrival, cv, seed)
    records = [
        TraceRecord(float(t), s.prompt_tokens, s.output_tokens, None, s.prompt_text, row)
        for t, s, row in zip(times, samples, rows, strict=True)
    ]
    return records, f"{lengths}; {arrivals}"


def _sharegpt_or_fallback(
    n: int, seed: int, directory: str | Path | None, max_context: int, fallback: bool
) -> tuple[list[LengthSample], str]:
    folder = data_dir_path(directory)
    try:
        samples = load_sharegpt(directory, n, seed, max_context)
    except DataMissing:
        if not fallback:
            raise
        samples = _synthetic(n, np.random.default_rng([seed, 1]), max_context)
        return samples, f"synthetic (ShareGPT-like lengths; {folder} absent)"
    return samples, f"sharegpt ({folder / SHAREGPT_FILE}, history+prompt input)"


def _alpaca_lengths(
    n: int, rng: np.random.Generator, directory: str | Path | None, max_context: int
) -> tuple[list[LengthSample], list[int | None], str]:
    """Output = Vicuna-7B len_t0.7 of a drawn row (no replacement while possible).

    The Alpaca prompt text is not in ../shared/data, so prompt lengths are drawn from ShareGPT's
    prompt-only distribution (single-turn requests, no history).
    """
    data = load_alpaca_lengths(directory)
    rows = rng.choice(len(data), size=n, replace=n > len(data)).tolist()
    prompts = _draw_quantiles("prompt", n, rng).tolist()
    outputs = data["len_t0.7"][rows].tolist()
    pairs = zip(prompts, outputs, strict=True)
    samples = [LengthSample(*cap_lengths(p, o, max_context)) for p, o in pairs]
    lengths = "alpaca (Vicuna-7B len_t0.7 outputs; prompt lengths drawn from ShareGPT prompts)"
    return samples, rows, lengths


def _synthetic(n: int, rng: np.random.Generator, max_context: int) -> list[LengthSample]:
    samples = synthetic_sharegpt_like(n, rng)
    return [LengthSample(*cap_lengths(p, o, max_context)) for p, o, _ in samples]


def _arrivals(n: int, rate: float, arrival: str, cv: float, seed: int) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng([seed, 2])
    if arrival == "poisson":
        return poisson_arrivals(n, rate, rng), f"poisson arrivals at {rate:g} req/s"
    if arrival == "gamma":
        return gamma_arrivals(n, rate, cv, rng), f"gamma arrivals at {rate:g} req/s, cv {cv:g}"
    raise ValueError(f"arrival must be 'poisson' or 'gamma', got {arrival!r}")


def _azure_workload(
    rate: float | None, n: int | None, directory: str | Path | None, max_context: int
) -> tuple[list[TraceRecord], str]:
    records = load_azure_conv(directory, max_context, limit=n)
    source = f"azure_conv ({data_dir_path(directory) / AZURE_CONV_FILE}, {len(records)} rows)"
    if rate is None:
        return records, f"{source}; real timestamps"
    if len(records) < 2 or rate <= 0:
        raise ValueError(f"rescaling to a rate needs rate > 0 and n >= 2, got {rate}, {n}")
    scale = rate / mean_rate(records)
    scaled = [dataclasses.replace(r, arrival_s=r.arrival_s / scale) for r in records]
    return scaled, f"{source}; real gaps scaled to {rate:g} req/s (rate x{scale:.3g})"
