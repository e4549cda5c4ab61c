"""The decoder layer's C++ glue (csrc/fused_ops.cpp: residual add + RMSNorm, SiLU * up, rotary)
against the eager torch code it replaces, op by op and as a whole model: fp32 to float
rounding, bf16 to one bf16 step, in-place effects exactly where documented, and a ModelRunner
with the ops giving the same greedy tokens as one without."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from ecoserve_worker import kernels  # noqa: E402
from ecoserve_worker.model_runner import ModelRunner, _rotate_half, greedy  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    found = kernels.fused_ops()
    if found is None:
        pytest.skip(
            "C++ kernels unavailable (ECOSERVE_KERNELS=0, or their build failed: see the "
            "warning logged by ecoserve_worker.kernels)"
        )
    return found


def ulp(t: torch.Tensor) -> torch.Tensor:
    """One step of t's dtype at each value's magnitude (bf16 keeps 8 significant bits)."""
    bits = 23 if t.dtype == torch.float32 else 7
    return torch.exp2(torch.floor(torch.log2(t.float().abs().clamp_min(1e-30))) - bits)


def close(got: torch.Tensor, want: torch.Tensor, steps: float) -> bool:
    err = (got.float() - want.float()).abs()
    return bool((err <= steps * ulp(want) + 1e-6).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 64), (16, 576), (5, 100)])  # 100: a non-multiple of 8
def test_add_rms_norm_adds_in_place_and_normalises(ops, dtype, rows, n):
    g = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, n, generator=g).to(dtype)
    delta = torch.randn(rows, n, generator=g).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    residual = x + delta
    y = ops.add_rms_norm(x, delta, w, 1e-5)
    assert torch.equal(x, residual)  # the residual stream, updated in place, rounded as torch
    assert close(y, F.rms_norm(residual, (n,), w, 1e-5), 1 if dtype == torch.bfloat16 else 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_without_delta_leaves_x(ops, dtype):
    x = torch.randn(4, 48).to(dtype)
    before = x.clone()
    w = torch.rand(48).to(dtype)
    y = ops.add_rms_norm(x, None, w, 1e-6)
    assert torch.equal(x, before)
    assert close(y, F.rms_norm(x, (48,), w, 1e-6), 1 if dtype == torch.bfloat16 else 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("half", [1536, 20])
def test_silu_mul_is_silu_gate_times_up(ops, dtype, half):
    gate_up = (torch.randn(7, 2 * half) * 6).to(dtype)  # wide range: exp's clamps are reached
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -1e-3]).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert close(ops.silu_mul(gate_up), F.silu(gate) * up, 1 if dtype == torch.bfloat16 else 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_rotates_q_and_k_in_place_only(ops, dtype):
    rows, nh, kvh, d = 6, 9, 3, 64
    qkv = torch.randn(rows, nh + 2 * kvh, d).to(dtype)
    pos = torch.arange(rows, dtype=torch.float32)[:, None]
    angle = pos / (10000 ** (torch.arange(d // 2) / (d // 2)))
    cos = torch.cat([angle.cos(), angle.cos()], -1)[:, None].to(dtype)
    sin = torch.cat([angle.sin(), angle.sin()], -1)[:, None].to(dtype)
    qk = qkv[:, : nh + kvh]
    want = _rotate_half(qk).mul_(sin).addcmul_(qk, cos)  # the torch path's own arithmetic
    v_before = qkv[:, nh + kvh :].clone()
    ops.rope_(qk, cos, sin)  # a strided view: rows of the fused q/k/v projection
    assert torch.equal(qkv[:, : nh + kvh], want)
    assert torch.equal(qkv[:, nh + kvh :], v_before)


def test_bad_shapes_are_refused_not_read_past(ops):
    with pytest.raises(RuntimeError, match="weight"):
        ops.add_rms_norm(torch.randn(2, 8), None, torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="2I"):
        ops.silu_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="cos and sin"):
        ops.rope_(torch.randn(2, 3, 8), torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        ops.silu_mul(torch.randn(2, 8, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_with_fused_ops_matches_the_torch_path(ops, model_dir, dtype):
    """Prefill then 12 greedy decode steps of three prompts: the same tokens either way, and
    logits within rounding."""
    runner = ModelRunner(model_dir, dtype=dtype, num_blocks=64, block_size=4)
    assert runner.fused is not None
    prompts = [[5, 17, 99, 3, 41], [7] * 11, [200, 13]]
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(3)]

    def run(fused) -> tuple[list[list[int]], list[torch.Tensor]]:
        runner.fused = fused
        seqs = [(f"r{i}", p, 0, tables[i]) for i, p in enumerate(prompts)]
        logits = [runner.step(seqs)]
        outs = [[t] for t in greedy(logits[-1])]
        for _ in range(12):
            seqs = [
                (f"r{i}", [o[-1]], len(p) + len(o) - 1, tables[i])
                for i, (p, o) in enumerate(zip(prompts, outs, strict=True))
            ]
            logits.append(runner.step(seqs))
            for o, t in zip(outs, greedy(logits[-1]), strict=True):
                o.append(t)
        return outs, logits

    fused_tokens, fused_logits = run(ops)
    torch_tokens, torch_logits = run(None)
    assert fused_tokens == torch_tokens
    tol = 1e-4 if dtype == torch.float32 else 0.15
    for a, b in zip(fused_logits, torch_logits, strict=True):
        assert (a - b).abs().max().item() < tol
