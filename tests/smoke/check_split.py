"""Install the SDK alone, then the scheduler alone, each into a fresh venv (no torch on the
index path: a pinned torch would come only from the worker or predictor[train]), and run its
smoke test there. Non-editable installs, so only what each distribution ships is importable."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = {
    "sdk": ([REPO / "services/common", REPO / "sdk"], "sdk_smoke.py"),
    "scheduler": ([REPO / "services/common", REPO / "services/scheduler"], "scheduler_smoke.py"),
}


def run(name: str, dists: list[Path], smoke: str) -> None:
    with tempfile.TemporaryDirectory(prefix=f"ecoserve-{name}-") as tmp:
        venv.create(tmp, with_pip=True)
        py = str(Path(tmp) / "bin" / "python")
        print(f"[{name}] installing {', '.join(d.name for d in dists)}", flush=True)
        subprocess.run(
            [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *map(str, dists)],
            check=True,
        )
        for d in dists:  # setuptools builds in the source tree; leave it as it was
            shutil.rmtree(d / "build", ignore_errors=True)
        # Run from the temp dir so the repository's sources are not on the path.
        subprocess.run([py, str(Path(__file__).parent / smoke)], check=True, cwd=tmp)


def main() -> int:
    for name, (dists, smoke) in CASES.items():
        run(name, dists, smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
