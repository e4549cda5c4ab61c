"""The worker CLI's model, device and dtype arguments (no model is loaded here)."""

from __future__ import annotations

import pytest

from ecoserve_worker.__main__ import build_parser, main
from ecoserve_worker.dtypes import cpu_flags, default_dtype

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
    assert build_parser().parse_args([*BASE, "--model", "x.gguf"]).model == "x.gguf"


CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [("", "float32"), ("avx512_bf16", "bfloat16"), ("amx_tile amx_bf16", "bfloat16")],
)
def test_cpu_default_dtype_follows_native_bf16(extra, expected):
    """bf16 only where the CPU computes it natively (emulated bf16 is slower than fp32)."""
    torch = pytest.importorskip("torch")
    flags = cpu_flags(CPUINFO.format(extra=extra))
    assert "avx512f" in flags
    if expected == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        expected = "float32"  # a torch without oneDNN bf16 kernels stays in fp32
    assert default_dtype("cpu", flags) == expected


def test_cpu_flags_of_nothing_is_empty():
    assert cpu_flags("model name : something\n") == frozenset()


def test_cpu_model_and_flags_come_from_the_first_cpu():
    from ecoserve_worker.cpuinfo import cpu_model

    two = CPUINFO.format(extra="") + "model name\t: AMD EPYC\n\nprocessor\t: 1\nflags : amx_bf16\n"
    assert cpu_model(two) == "AMD EPYC"
    assert "amx_bf16" not in cpu_flags(two) and "avx512f" in cpu_flags(two)


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
    assert main([*BASE, "--insecure", "--device", "cuda", "--model", "/nonexistent"]) == 2
    assert "CUDA is not available" in caplog.text


def test_missing_model_is_a_clear_error(tmp_path, caplog):
    assert main([*BASE, "--insecure", "--model", str(tmp_path)]) == 2  # keys are checked first
    assert "no config.json" in caplog.text
