"""Weight-only int8/int4 quantization (`--quantization`, ecoserve_worker/quant.py) on the tiny
random-weight model: the kernels compute what the quantized weights say, the quantized model's
logits stay near the unquantized ones, greedy decode runs through ModelRunner with it on, each
step picks the quantized or the dense kernel by its row count, and bad settings are refused."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ecoserve_worker import profile_cache, quant  # noqa: E402
from ecoserve_worker.__main__ import build_parser, main  # noqa: E402
from ecoserve_worker.model_runner import ModelRunner, _Proj, greedy  # noqa: E402

BASE = ["--scheduler", "tcp://127.0.0.1:1"]
# Relative L2 error of the tiny model's logits against the same model unquantized (measured:
# int8 0.8-1.1 %, int4 10.5-11.6 %: 4 bits over each group's range of Gaussian weights, worst
# case; the real model's weights sit on a Q4 grid already). A wrong scale, zero point or
# packing gives errors of order 100 %.
BOUND = {"int8": 0.02, "int4": 0.2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def dequantized(w: torch.Tensor, mode: str) -> torch.Tensor:
    """The weights each kernel should be multiplying by, rebuilt from its own tensors' recipe
    (independently of the packing)."""
    if mode == "int8":
        scale = w.abs().amax(1, keepdim=True) / 127
        return torch.round(w / scale).clamp(-127, 127) * scale
    g = w.view(w.shape[0], -1, quant.INT4_GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    return (torch.round((g - lo) / s).clamp(0, 15) * s + lo).view_as(w)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_kernel_multiplies_by_the_quantized_weights(mode):
    """In fp32 (exact enough to check the layout; the worker runs bf16) the packed kernel
    equals x @ dequantized(W)^T to rounding, so the scales, zero points and int4 packing are
    right (not merely close enough)."""
    torch.manual_seed(0)
    w, x = torch.randn(48, 96), torch.randn(5, 96)
    q = quant._Int8(w) if mode == "int8" else quant._Int4(w)
    want = x @ dequantized(w, mode).T
    assert rel(q(x), want) < 1e-5
    assert rel(q(x), x @ w.T) < BOUND[mode] / 2  # and it is the weight, approximately


@pytest.fixture(scope="module")
def runners(model_dir):
    """bf16: the unquantized runner and one per mode, quantized at every row count."""
    out = {"none": ModelRunner(model_dir, dtype=torch.bfloat16, num_blocks=64, block_size=4)}
    for mode in ("int8", "int4"):
        out[mode] = ModelRunner(
            model_dir,
            dtype=torch.bfloat16,
            num_blocks=64,
            block_size=4,
            quantization=mode,
            quant_max_rows=1 << 20,
        )
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_logits_close_to_unquantized(runners, mode):
    ref, q = runners["none"], runners[mode]
    assert q.quant.projections == 2 * 4 and not q.quant.lm_head and not q.quant.skipped
    prompts = [[5, 17, 99, 3, 41, 8, 250], [7] * 11, [200, 13]]
    seqs = [(f"r{i}", p, 0, list(range(i * 8, i * 8 + 8))) for i, p in enumerate(prompts)]
    assert rel(q.step(seqs), ref.step(seqs)) < BOUND[mode]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_greedy_decode_with_quantization_on(model_dir, runners, mode):
    """Through the serving path (C++ glue where it builds, paged attention) with the shipped
    threshold: prefill dense, single-row decode steps quantized. Each step's logits stay near
    the unquantized runner's on the same tokens (teacher-forced), and the tokens are real."""
    ref = runners["none"]
    q = ModelRunner(model_dir, dtype=torch.bfloat16, num_blocks=64, block_size=4, quantization=mode)
    assert q.quant.max_rows == quant.MAX_ROWS[mode]
    prompt, table = [5, 17, 99, 3, 41], list(range(16))
    out = greedy(q.step([("r", prompt, 0, table)]))
    for _ in range(15):
        step = [("r", [out[-1]], len(prompt) + len(out) - 1, table)]
        a = q.step(step)
        assert rel(a, ref.step(step)) < BOUND[mode]
        out += greedy(a)
    assert len(out) == 16 and all(0 <= t < q.config.vocab_size for t in out)


def test_each_step_picks_its_kernel_by_row_count(model_dir):
    """Steps of at most max_rows rows run the quantized copies, bigger ones the dense ones."""
    r = ModelRunner(model_dir, dtype=torch.bfloat16, num_blocks=64, block_size=4)
    r.quant = quant.quantize_runner(r, "int4", max_rows=3, lm_head=True)
    calls = {"quant": 0, "dense": 0}

    def spy(fn, kind):
        def wrapped(x):
            calls[kind] += 1
            return fn(x)

        return wrapped

    projs = [p for layer in r.layers for p in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
    for p in [*projs, r.lm_head]:
        assert isinstance(p, quant.QuantProj)
        p.quant, p.dense = spy(p.quant, "quant"), spy(p.dense, "dense")
    r.step([("a", [1, 2, 3, 4, 5, 6], 0, [0, 1])])  # 6 rows: dense; its lm_head samples 1 row
    assert calls == {"quant": 1, "dense": 8}
    calls.update(quant=0, dense=0)
    r.step([(f"d{i}", [9], 0, [i]) for i in range(3)])  # 3 rows: quantized
    assert calls == {"quant": 9, "dense": 0}
    r.step([(f"d{i}", [9], 0, [i]) for i in range(4)])  # 4 rows: dense
    assert calls == {"quant": 9, "dense": 9}


def test_shapes_the_int4_kernel_cannot_take_stay_dense():
    """int4 packs N in 16s and K in groups of 32: other projections are kept dense, said so."""

    def proj(n, k):
        return _Proj(torch.randn(n, k).bfloat16(), None, prepack=False)

    layer = SimpleNamespace(qkv=proj(64, 64), o_proj=proj(64, 48), gate_up=proj(40, 64))
    layer.down = proj(64, 64)
    runner = SimpleNamespace(
        layers=[layer], lm_head=proj(96, 64), device=torch.device("cpu"), dtype=torch.bfloat16
    )
    report = quant.quantize_runner(runner, "int4", lm_head=True)
    assert report.projections == 3 and report.lm_head
    assert report.skipped == ["layer0.o_proj [64, 48]", "layer0.gate_up [40, 64]"]
    assert isinstance(layer.qkv, quant.QuantProj) and isinstance(layer.o_proj, _Proj)
    assert "kept dense: layer0.o_proj" in report.describe()
    x = torch.randn(2, 64).bfloat16()
    assert rel(layer.qkv(x), x @ layer.qkv.dense.weight.T) < BOUND["int4"]


@pytest.mark.parametrize("value", ["int3", "fp8", "INT8", ""])
def test_cli_refuses_unknown_values(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE, "--quantization", value])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_default_is_none_and_values_parse():
    assert build_parser().parse_args(BASE).quantization == "none"
    assert build_parser().parse_args([*BASE, "--quantization", "int4"]).quantization == "int4"


def test_quantization_is_cpu_only(caplog):
    with pytest.raises(ValueError, match="CPU only"):
        quant.check("int8", "cuda", torch.bfloat16)
    quant.check("none", "cuda", torch.float64)  # nothing to refuse
    args = [*BASE, "--insecure", "--device", "cuda", "--quantization", "int4", "--model", "/x"]
    assert main(args) == 2  # refused before the model (or CUDA) is looked at
    assert "CPU only" in caplog.text


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_quantization_needs_bf16(dtype, caplog):
    """The kernels take fp32/fp16 activations, but beat the dense path only in bf16."""
    with pytest.raises(ValueError, match=f"needs --dtype bfloat16, not {dtype}"):
        quant.check("int4", "cpu", getattr(torch, dtype))
    args = [*BASE, "--insecure", "--dtype", dtype, "--quantization", "int8", "--model", "/x"]
    assert main(args) == 2  # refused before the model is looked for
    assert "needs --dtype bfloat16" in caplog.text


def test_runner_refuses_before_loading(tmp_path):
    with pytest.raises(ValueError, match="expected one of none, int8, int4"):
        ModelRunner(tmp_path, quantization="int2")  # no config.json there: checked first
    with pytest.raises(ValueError, match="needs --dtype bfloat16"):
        ModelRunner(tmp_path, dtype=torch.float32, quantization="int4")


def test_profile_key_tells_quantized_runners_apart(model_dir, runners):
    plain, q8 = runners["none"], runners["int8"]
    keys = {profile_cache.profile_key(r, model_dir, 1, [(1, 1, 0, 0)]) for r in (plain, q8)}
    assert len(keys) == 2
    # the unquantized key is what it was before quantization existed (no cached profile lost)
    old = SimpleNamespace(**{k: getattr(plain, k) for k in ("dtype", "device", "block_size")})
    old.num_blocks = plain.num_blocks
    assert profile_cache.profile_key(old, model_dir, 1, [(1, 1, 0, 0)]) in keys


def test_launcher_passes_quantization_to_workers():
    from ecoserve_stack import launcher

    a = launcher.build_parser().parse_args(["--quantization", "int8"])
    cmd = launcher.worker_command(a, "w0", "tcp://127.0.0.1:1", "/m", 1)
    assert cmd[cmd.index("--quantization") + 1] == "int8"
    plain = launcher.build_parser().parse_args([])
    assert "--quantization" not in launcher.worker_command(plain, "w0", "tcp://x:1", "/m", 1)
    for refused in (["--device", "cuda"], ["--dtype", "float32"]):
        with pytest.raises(SystemExit):
            launcher.main([*refused, "--quantization", "int4"])
