"""Smoke test of the scheduler alone (run in a venv holding only ecoserve-scheduler and its
deps): no torch or transformers, every live module imports, and the core schedules a workload
through the simulator."""

from __future__ import annotations

import importlib
import importlib.util

for heavy in ("torch", "transformers", "onnxruntime"):
    assert importlib.util.find_spec(heavy) is None, f"the scheduler's environment holds {heavy}"

for module in ("api", "engine", "frontend", "http_api", "prediction", "serve", "tokenizer"):
    importlib.import_module(f"ecoserve_scheduler.live.{module}")

from ecoserve_scheduler.cli import main  # noqa: E402

assert (
    main(
        [
            "compare",
            "--trace",
            "synthetic",
            "--policies",
            "ecoserve,vllm",
            "--rates",
            "2",
            "--n",
            "60",
        ]
    )
    == 0
)
print("scheduler smoke: ok")
