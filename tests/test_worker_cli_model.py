"""The worker CLI's model, device and dtype arguments (no model is loaded here)."""

from __future__ import annotations

import pytest

from ecoserve_worker.__main__ import DEFAULT_DTYPE, build_parser, main

BASE = ["--scheduler", "tcp://127.0.0.1:1"]


def test_model_defaults_to_smollm2_only_without_sim_or_echo():
    args = build_parser().parse_args(BASE)
    assert (args.model, args.sim, args.echo, args.dtype, args.device) == (
        None,
        None,
        False,
        None,
        "cpu",
    )
    assert DEFAULT_DTYPE == {"cpu": "float32", "cuda": "bfloat16"}
    assert build_parser().parse_args([*BASE, "--model", "x.gguf"]).model == "x.gguf"


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_device_accepted(device):
    assert build_parser().parse_args([*BASE, "--device", device]).device == device


@pytest.mark.parametrize("device", ["gpu", "cpu:0", "cuda:x", "mps"])
def test_device_refused(device):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--device", device])


def test_cuda_without_cuda_is_a_clear_error(caplog):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main([*BASE, "--device", "cuda", "--model", "/nonexistent"]) == 2
    assert "CUDA is not available" in caplog.text


def test_missing_model_is_a_clear_error(tmp_path, caplog):
    assert main([*BASE, "--model", str(tmp_path)]) == 2
    assert "no config.json" in caplog.text
