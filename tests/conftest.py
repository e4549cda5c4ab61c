"""Shared fixtures: a free local port, the tiny random-weight model (built once per session)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

# Test modules import helpers from each other (e.g. test_import_rules); keep tests/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))


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
