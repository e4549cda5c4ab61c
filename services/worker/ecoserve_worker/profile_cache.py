"""Start-up profiles kept between runs, so a worker that has profiled a model on a machine once
is ready in seconds the next time (profiling SmolLM2's default grid takes ~1-2 min on 2 cores).

A profile is only reused by a worker that would measure the same thing: the key hashes the
model's config and weights (the manifest's digests where the model has one, else file sizes
and modification times), dtype, quantization (and its row threshold), device, torch threads,
block size, pool size, the shape grid, the torch version and the CPU model. Anything else
changes the key, and the worker profiles again. Files live in `$ECOSERVE_PROFILE_CACHE`, else
`~/.cache/ecoserve/profiles`, one JSON per key, written atomically (temp file + rename) so two
workers starting together cannot leave half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cpuinfo import cpu_model

MANIFEST = "ecoserve-model.json"
VERSION = 1  # bump when what a profile row means changes


def cache_root() -> Path:
    env = os.environ.get("ECOSERVE_PROFILE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ecoserve" / "profiles"


def _model_identity(model_dir: Path) -> Any:
    manifest = model_dir / MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", {})
        return sorted((name, meta.get("sha256")) for name, meta in files.items())
    return sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir() if p.is_file()
    )


def profile_key(runner, model_dir: Path, threads: int, shapes: Sequence[Sequence[int]]) -> str:
    """The hash of everything a profile's timings depend on."""
    import torch

    parts = {
        "version": VERSION,
        "model": _model_identity(Path(model_dir)),
        "config": (Path(model_dir) / "config.json").read_text(),
        "dtype": str(runner.dtype),
        "device": str(runner.device),
        "threads": threads,
        "block_size": runner.block_size,
        "num_blocks": runner.num_blocks,
        "shapes": [list(s) for s in shapes],
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }
    q = getattr(runner, "quant", None)
    if q is not None and q.quantization != "none":  # absent for none: earlier keys stay valid
        parts["quantization"] = [q.quantization, q.max_rows, q.lm_head]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load(key: str, root: Path | None = None) -> list[dict[str, Any]] | None:
    """The rows stored under `key`, or None (absent or unreadable: profile again)."""
    path = (root or cache_root()) / f"{key}.json"
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rows if isinstance(rows, list) and rows else None


def store(key: str, rows: list[dict[str, Any]], root: Path | None = None) -> Path:
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{key}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"key": key, "rows": rows}, f)
    path = root / f"{key}.json"
    os.replace(tmp, path)
    return path
