"""The C++ paged-decode kernel (ecoserve_worker/kernels.py, csrc/paged_decode.cpp) against
the torch reference: random pools, scattered block tables, ragged contexts, sliding windows,
fp32 and bf16; slots no row may read hold NaN, so reading one shows. And the loader's
fallbacks: ECOSERVE_KERNELS=0 and a failed build give None (the torch path), never an error.
The fused glue ops (csrc/fused_ops.cpp) are tested in test_worker_fused_ops.py.
"""

from __future__ import annotations

import logging
import math

import pytest

torch = pytest.importorskip("torch")

from ecoserve_worker import kernels  # noqa: E402
from ecoserve_worker.attention import PagedAttention  # noqa: E402
from ecoserve_worker.model_runner import inputs_from_rows  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}  # bf16: the output's own rounding


@pytest.fixture(scope="module")
def op():
    fn = kernels.paged_decode()
    if fn is None:
        pytest.skip(
            "C++ paged-decode kernel unavailable (ECOSERVE_KERNELS=0, or its build failed: "
            "see the warning logged by ecoserve_worker.kernels)"
        )
    return fn


def make_case(
    lens, bs, kvh, g, d, window, dtype, seed, num_blocks=None, index=torch.int32, pad=None
):
    """q, a pool where every slot outside the rows' attended tokens is `pad` (NaN: any read
    shows), tables [B, W] with random distinct blocks, padded with random blocks."""
    gen = torch.Generator().manual_seed(seed)
    widths = [(n - 1) // bs + 1 for n in lens]
    w = max(widths) + 2  # tables longer than any row needs: reserved blocks are never read
    nb = num_blocks or sum(widths) + 8
    pool = torch.randn(2, kvh, nb, bs, d, generator=gen).to(dtype)
    q = torch.randn(len(lens), kvh * g, d, generator=gen).to(dtype)
    perm = torch.randperm(nb, generator=gen).tolist()
    tables = torch.randint(0, nb, (len(lens), w), generator=gen)  # padding: any block
    used = torch.zeros(nb, bs, dtype=torch.bool)
    for r, n in enumerate(lens):
        tables[r, : widths[r]] = torch.tensor(perm[: widths[r]])
        perm = perm[widths[r] :]
        first = 0 if window is None else max(0, n - window)
        for p in range(first, n):
            used[tables[r, p // bs], p % bs] = True
    if pad is not None:
        pool[:, :, ~used] = pad
    return q, pool, tables.to(index), torch.tensor(lens, dtype=torch.int32)


def reference(q, pool, tables, lens, window, scale):
    """Each row's attended tokens gathered one by one, softmax attention in float64."""
    b, h, d = q.shape
    kvh, bs = pool.shape[1], pool.shape[3]
    out = torch.empty(b, h, d, dtype=torch.float64)
    for r in range(b):
        n = int(lens[r])
        pos = torch.arange(0 if window is None else max(0, n - window), n)
        slots = tables[r].long()[pos // bs], pos % bs
        k = pool[0][:, slots[0], slots[1]].double()  # [KVH, n, D]
        v = pool[1][:, slots[0], slots[1]].double()
        qr = q[r].double().view(kvh, h // kvh, d)
        p = torch.softmax(qr @ k.transpose(-1, -2) * scale, -1)
        out[r] = (p @ v).reshape(h, d)
    return out.reshape(b, h * d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 16, 37])
@pytest.mark.parametrize(
    "lens,bs,kvh,g,d",
    [
        ([1, 16, 17, 100, 320, 33, 2], 16, 3, 3, 64),  # SmolLM2's heads, ragged rows
        ([5, 1, 64, 9], 4, 2, 4, 32),
        ([200], 16, 1, 1, 80),  # one head
        ([200, 3, 45], 16, 2, 3, 72),  # D not a multiple of 16: the generic loops
        ([48, 47, 49], 16, 4, 2, 128),
        ([70, 20, 1], 32, 2, 3, 96),  # two tiles a block; heads in groups of 2 and 1
        ([33, 64], 8, 1, 5, 256),
    ],
)
def test_kernel_matches_reference(op, dtype, window, lens, bs, kvh, g, d):
    q, pool, tables, ln = make_case(lens, bs, kvh, g, d, window, dtype, 1, pad=float("nan"))
    scale = 1 / math.sqrt(d)
    out = op(q, pool, tables, ln, window or 0, scale)
    assert out.dtype == dtype and out.shape == (len(lens), kvh * g * d)
    assert torch.isfinite(out).all(), "a slot outside a row's context was read"
    ref = reference(q, pool, tables, ln, window, scale)
    assert torch.allclose(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_kernel_int64_tables_and_strided_q(op):
    """The runner passes q as a view of the fused qkv projection (rows strided)."""
    lens = [30, 7, 64]
    q, pool, tables, ln = make_case(lens, 16, 3, 3, 64, None, torch.float32, 2, pad=float("nan"))
    qkv = torch.randn(3, 9 + 6, 64)
    qkv[:, :9] = q
    out = op(qkv[:, :9], pool, tables.long(), ln.long(), 0, 0.125)
    ref = reference(q, pool, tables, ln, None, 0.125)
    assert torch.allclose(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_kernel_rejects_out_of_range_blocks(op):
    q, pool, tables, ln = make_case([20, 20], 16, 1, 2, 16, None, torch.float32, 3)
    tables[1, 1] = pool.shape[2]  # the second block of row 1 is read
    with pytest.raises(RuntimeError, match="outside pool"):
        op(q, pool, tables, ln, 0, 1.0)
    tables[1, 1] = 0
    with pytest.raises(RuntimeError, match="tokens"):
        op(q, pool, tables, ln.new_tensor([20, 10**6]), 0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_paged_attention_kernel_equals_torch_path(op, dtype):
    """Through PagedAttention as the runner calls it (the new K/V written first), a full and a
    windowed layer: the kernel and the torch path (grouped by length, padded, masked) agree.
    Unused slots hold large finite garbage: the torch path multiplies padding by 0."""
    kvh, g, d, bs = 3, 3, 64, 16
    lens = [1, 5, 300, 17, 64, 129, 230, 2]
    attn = PagedAttention([None, 48], 200, bs, kvh * g, kvh, d, dtype, torch.device("cpu"))
    assert attn.kernel is op
    for li in range(2):
        q, pool, tables, ln = make_case(lens, bs, kvh, g, d, None, dtype, 10 + li, 200, pad=1e4)
        attn.kv_cache[li].copy_(pool)
    w = tables.shape[1]
    rows = [(f"r{i}", [1], n - 1, tables[i].tolist()[: w - i % 3]) for i, n in enumerate(lens)]
    gen = torch.Generator().manual_seed(7)  # seeded: an unseeded draw failed 1 run in 4
    x = torch.randn(2, len(lens), kvh * g + 2 * kvh, d, generator=gen).to(dtype)
    outs = []
    for kernel in (op, None):
        attn.kernel = kernel
        batch = attn.batch(inputs_from_rows(rows))
        assert (len(batch.decode.groups) == 1) == (kernel is not None)
        for li in range(2):
            new_kv = x[li, :, kvh * g :].view(len(lens), 2, kvh, d)
            outs.append(attn(li, x[li, :, : kvh * g], new_kv, 0.125, batch))
    # fp32: two summation orders over up to 300 positions differ by ~1e-5 at worst; a wrong
    # mask, window or block differs by O(1).
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(outs[:2], outs[2:], strict=True):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "0")
    kernels._load.cache_clear()
    try:
        assert kernels.paged_decode() is None
        attn = PagedAttention([None], 8, 4, 2, 1, 8, torch.float32, torch.device("cpu"))
        assert attn.kernel is None
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()


def test_build_failure_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error deliberately broken\n")
    monkeypatch.setenv(kernels.ENV, "1")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(kernels, "SOURCES", [broken])
    monkeypatch.setattr(kernels, "cpu_tag", lambda: "broken_test")
    kernels._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=kernels.__name__):
            assert kernels.paged_decode() is None
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "torch path" in caplog.records[0].getMessage()
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()


def test_no_compiler_falls_back_with_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(kernels.ENV, "1")
    monkeypatch.setenv("CXX", "no-such-compiler-ecoserve")
    kernels._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=kernels.__name__):
            assert kernels.paged_decode() is None
        assert ["no compiler" in r.getMessage() for r in caplog.records] == [True]
    finally:
        monkeypatch.undo()
        kernels._load.cache_clear()


def test_build_command_says_what_the_worker_will_use():
    """`python -m ecoserve_worker.kernels` (run by `make model`) exits 0 with or without the
    kernel and says which path a worker gets."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ECOSERVE_KERNELS="0")
    off = subprocess.run(
        [sys.executable, "-m", "ecoserve_worker.kernels"], env=env, capture_output=True, text=True
    )
    assert off.returncode == 0 and "unavailable (torch path)" in off.stdout
