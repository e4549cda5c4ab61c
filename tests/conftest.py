"""Shared fixtures: a free local port, the tiny random-weight model (built once per session)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

# Test modules import helpers from each other (e.g. test_import_rules); keep tests/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session", autouse=True)
def _private_profile_cache(tmp_path_factory):
    """Workers started by tests keep their start-up profiles in a session directory, never in
    the user's ~/.cache (a test must not reuse a profile from an earlier run)."""
    import os

    old = os.environ.get("ECOSERVE_PROFILE_CACHE")
    os.environ["ECOSERVE_PROFILE_CACHE"] = str(tmp_path_factory.mktemp("profiles"))
    yield
    if old is None:
        del os.environ["ECOSERVE_PROFILE_CACHE"]
    else:
        os.environ["ECOSERVE_PROFILE_CACHE"] = old


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64, GQA) and its BPE tokenizer; needs torch."""
    pytest.importorskip("torch")
    from ecoserve_worker.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def start_up(args: list[str], timeout_s: float, stderr: int = subprocess.PIPE):
    """`ecoserve up ARGS` as a process, returned once it printed its `ready` line, with the
    stdout lines read so far (a reader thread keeps appending); AssertionError with what it
    printed if it is not ready within `timeout_s`."""
    cmd = [sys.executable, "-m", "ecoserve_stack.cli", "up", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout_s):
        proc.kill()
        raise AssertionError("not ready: " + "".join(lines)[-3000:])
    return proc, lines
