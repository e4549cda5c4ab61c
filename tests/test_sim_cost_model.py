"""The simulator's per-iteration cost model, its shipped profiles, and the fit behind them."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
from pathlib import Path

import pytest

from ecoserve_common.plan import BatchShape
from ecoserve_scheduler.sim.cost_model import (
    COEFFICIENTS,
    CostModel,
    Profile,
    fit_profile,
    list_profiles,
    load_profile,
    load_timings,
    save_profile,
)

SHIPPED = (
    "llama-2-7b/a100-80gb",
    "llama-2-7b/h100-80gb",
    "llama-2-13b/a100-80gb",
    "llama-2-13b/h100-80gb",
)
DATA_DIR = Path(
    os.environ.get("ECOSERVE_DATA_DIR", Path(__file__).parents[1] / ".." / "shared" / "data")
)


@pytest.fixture(scope="module")
def a100_7b() -> CostModel:
    return CostModel(load_profile("llama-2-7b/a100-80gb"))


# ---- shipped profiles ------------------------------------------------------------------------


def test_all_shipped_profiles_load_with_sources():
    assert set(SHIPPED) <= set(list_profiles())
    for name in SHIPPED:
        profile = load_profile(name)
        assert profile.name == name
        assert load_profile(name.replace("/", "_")).to_dict() == profile.to_dict()
        for key in ("w_mem", "s_tok", "c0", "a_dec", "p_quad", "model", "accelerator"):
            assert profile.sources.get(key), f"{name}: no source for {key}"
        assert CostModel(profile).iteration_time(BatchShape(((128, 0),), 4, 400)) > 0


def test_unknown_profile_names_the_shipped_ones():
    with pytest.raises(KeyError, match="llama-2-7b/a100-80gb"):
        load_profile("no-such-model/tpu")


def test_13b_is_slower_and_h100_faster_than_7b_on_a100():
    def t(name: str) -> float:
        return CostModel(load_profile(name)).iteration_time(BatchShape(((512, 0),), 32, 32 * 600))

    assert t("llama-2-13b/a100-80gb") > t("llama-2-7b/a100-80gb") > t("llama-2-7b/h100-80gb")
    assert t("llama-2-13b/a100-80gb") > t("llama-2-13b/h100-80gb")


# ---- shape of the iteration-time model -------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_monotonic_in_each_input(name):
    model = CostModel(load_profile(name))
    base = BatchShape(((256, 512),), 16, 16 * 700)
    bigger = [
        BatchShape(((257, 512),), 16, 16 * 700),  # longer chunk
        BatchShape(((256, 600),), 16, 16 * 700),  # more cached context before the chunk
        BatchShape(((256, 512), (1, 0)), 16, 16 * 700),  # another chunk
        BatchShape(((256, 512),), 17, 16 * 700),  # more decode sequences
        BatchShape(((256, 512),), 16, 16 * 700 + 1),  # more decode context
    ]
    t0 = model.iteration_time(base)
    for shape in bigger:
        assert model.iteration_time(shape) > t0, shape
    # And along whole sweeps, including across the linear layers' knee.
    for make in (
        lambda n: BatchShape(((n, 0),)),
        lambda n: BatchShape((), n, n * 100),
        lambda n: BatchShape(((64, n),)),
        lambda n: BatchShape((), 8, n),
    ):
        times = [model.iteration_time(make(n)) for n in range(1, 4097, 37)]
        assert all(b > a for a, b in zip(times, times[1:], strict=False))


def test_empty_batch_takes_no_time(a100_7b):
    assert a100_7b.iteration_time(BatchShape()) == 0.0
    assert a100_7b.decode_step_time(0, 100) == 0.0


def test_memory_bound_floor(a100_7b):
    """Below the knee the weights are read once whatever the batch: 8 decodes cost ~1 decode."""
    one = a100_7b.iteration_time(BatchShape((), 1, 16))
    eight = a100_7b.iteration_time(BatchShape((), 8, 8 * 16))
    assert 1.0 < eight / one < 1.05


def test_decode_step_time_matches_iteration_time(a100_7b):
    shape = BatchShape((), 24, 24 * 300)
    assert a100_7b.decode_step_time(24, 300) == pytest.approx(a100_7b.iteration_time(shape))


def test_hard_knee_variant_is_the_max():
    profile = dataclasses.replace(load_profile("llama-2-7b/a100-80gb"), knee_p=None)
    model = CostModel(profile)
    assert model.linear_time(1) == profile.w_mem
    assert model.linear_time(4096) == pytest.approx(profile.s_tok * 4096)


# ---- calibration -----------------------------------------------------------------------------


def test_7b_a100_matches_vidur_sanity_figures(a100_7b):
    """README section 7: isolated 512-token prefill ~36.5 ms, batch-1 decode ~11.1 ms/token."""
    assert a100_7b.iteration_time(BatchShape(((512, 0),))) == pytest.approx(0.0365, rel=0.15)
    for context in (128, 512, 1024):
        assert a100_7b.decode_step_time(1, context) == pytest.approx(0.0111, rel=0.15)


@pytest.mark.parametrize("name", SHIPPED)
def test_token_budget_is_the_90_percent_knee(name):
    model = CostModel(load_profile(name))
    p = model.profile
    budget = model.token_budget()
    assert 256 <= budget <= 2048
    assert budget % 64 == 0

    def efficiency(tokens: int) -> float:  # throughput over its asymptote, recomputed here
        knee = (p.w_mem**p.knee_p + (p.s_tok * tokens) ** p.knee_p) ** (1 / p.knee_p)
        elapsed = p.c0 + knee + p.p_tok * tokens
        return tokens / elapsed * (p.s_tok + p.p_tok)

    assert efficiency(budget) >= 0.9 > efficiency(budget - 64)
    assert model.token_budget(0.8) <= budget <= model.token_budget(0.95)
    with pytest.raises(ValueError):
        model.token_budget(1.0)


def test_kv_blocks_7b_a100_close_to_vidur():
    profile = load_profile("llama-2-7b/a100-80gb")
    assert profile.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
    assert profile.num_blocks() == pytest.approx(7424, rel=0.05)
    assert profile.num_blocks() * profile.block_size <= profile.kv_capacity_tokens()


def test_kv_blocks_scale_with_model():
    b7 = load_profile("llama-2-7b/a100-80gb").num_blocks()
    b13 = load_profile("llama-2-13b/a100-80gb").num_blocks()
    assert 0.4 * b7 < b13 < 0.6 * b7


# ---- unloaded JCT ----------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "output"), [(1, 1), (100, 1), (700, 50), (3000, 257)])
def test_unloaded_jct_closed_form_matches_step_by_step(a100_7b, prompt, output):
    budget = 256
    expected = 0.0
    for start in range(0, prompt, budget):
        expected += a100_7b.iteration_time(BatchShape(((min(budget, prompt - start), start),)))
    for j in range(1, output):  # decode step j feeds position prompt + j - 1
        expected += a100_7b.iteration_time(BatchShape((), 1, prompt + j))
    assert a100_7b.unloaded_jct(prompt, output, token_budget=budget) == pytest.approx(expected)


def test_unloaded_jct_defaults_to_token_budget(a100_7b):
    budget = a100_7b.token_budget()
    assert a100_7b.unloaded_jct(2000, 10) == pytest.approx(
        a100_7b.unloaded_jct(2000, 10, token_budget=budget)
    )
    assert a100_7b.unloaded_jct(2000, 11) > a100_7b.unloaded_jct(2000, 10)


# ---- fitting ---------------------------------------------------------------------------------


def synthetic_rows(model: CostModel, n: int, noise: float, seed: int = 0) -> list[dict]:
    """Decode-only, prefill-only and mixed steps timed by `model`, with multiplicative noise."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        decode = chunk = context = decode_ctx = 0
        if i % 3 != 1:
            decode = rng.randint(1, 512 if i % 3 == 0 else 256)
            decode_ctx = decode * rng.randint(16, 2048)
        if i % 3 != 0:
            chunk = rng.randint(16, 4096 if i % 3 == 1 else 2048)
            context = rng.choice([0, rng.randint(0, 2048)])
        shape = BatchShape(((chunk, context),) if chunk else (), decode, decode_ctx)
        latency = model.iteration_time(shape) * (1 + rng.gauss(0, noise))
        rows.append(
            {
                "prefill_tokens": chunk,
                "prefill_context_tokens": context,
                "decode_seqs": decode,
                "decode_context_tokens": decode_ctx,
                "latency_s": latency,
            }
        )
    return rows


def blank(profile: Profile) -> Profile:
    return dataclasses.replace(profile, **dict.fromkeys(COEFFICIENTS, 0.0), w_mem=0.0, sources={})


def test_fit_profile_recovers_known_coefficients(a100_7b):
    truth = a100_7b.profile
    fitted = fit_profile(blank(truth), synthetic_rows(a100_7b, 300, noise=0.005))
    for name in ("w_mem", "s_tok", "a_dec", "a_dseq", "p_lin", "p_quad"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.05), name
    assert fitted.c0 == pytest.approx(truth.c0, rel=0.15)
    # p_tok is 4% of s_tok and nearly collinear with it; their sum is what the data pins down.
    assert fitted.s_tok + fitted.p_tok == pytest.approx(truth.s_tok + truth.p_tok, rel=0.02)
    assert fitted.fit_rel_error < 0.006
    assert "fit_profile" in fitted.sources["s_tok"]


def test_fit_profile_finds_knee_sharpness_exactly_without_noise():
    truth = dataclasses.replace(load_profile("llama-2-7b/h100-80gb"), knee_p=2.0)
    rows = synthetic_rows(CostModel(truth), 120, noise=0.0, seed=1)
    fitted = fit_profile(blank(dataclasses.replace(truth, knee_p=1.0)), rows, fit_knee_p=True)
    assert fitted.knee_p == 2.0
    for name in ("w_mem", *COEFFICIENTS):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-3), name
    assert fitted.fit_rel_error < 1e-4


def test_fit_profile_keeps_fixed_and_unobserved_coefficients(a100_7b):
    truth = a100_7b.profile
    decode_only = [r for r in synthetic_rows(a100_7b, 60, noise=0.0) if not r["prefill_tokens"]]
    base = dataclasses.replace(truth, c0=0.002, p_quad=1e-8)
    fitted = fit_profile(base, decode_only, fixed=("c0",))
    assert fitted.c0 == 0.002
    assert fitted.p_quad == 1e-8 and fitted.p_lin == truth.p_lin  # no prefill rows: kept
    with pytest.raises(ValueError):
        fit_profile(base, decode_only, fixed=("s_tok",))


def test_fit_profile_reads_jsonl_and_csv(tmp_path, a100_7b):
    rows = synthetic_rows(a100_7b, 90, noise=0.0, seed=2)
    jsonl = tmp_path / "steps.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = tmp_path / "steps.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert load_timings(jsonl) == rows
    assert load_timings(table)[0]["decode_seqs"] == rows[0]["decode_seqs"]
    for path in (jsonl, table):
        fitted = fit_profile(blank(a100_7b.profile), path)
        assert fitted.s_tok == pytest.approx(a100_7b.profile.s_tok, rel=1e-3)


def test_fit_profile_accepts_explicit_chunks(a100_7b):
    shape = BatchShape(((300, 0), (200, 1000)), 10, 5000)
    row = {"prefill_chunks": [[300, 0], [200, 1000]], "decode_seqs": 10}
    row.update(decode_context_tokens=5000, latency_s=a100_7b.iteration_time(shape))
    rows = [row, *synthetic_rows(a100_7b, 90, noise=0.0, seed=3)]
    fitted = fit_profile(blank(a100_7b.profile), rows)
    assert fitted.fit_rel_error < 1e-4


# ---- persistence -----------------------------------------------------------------------------


def test_profile_json_round_trip(tmp_path):
    profile = dataclasses.replace(
        load_profile("llama-2-13b/h100-80gb"), name="custom/gpu", knee_p=None
    )
    path = save_profile(profile, tmp_path)
    assert path.name == "custom_gpu.json"
    again = load_profile(path)
    assert again == profile
    assert again.to_dict() == profile.to_dict()


def test_profile_validation():
    data = load_profile("llama-2-7b/a100-80gb").to_dict()
    with pytest.raises(ValueError, match="unknown profile keys"):
        Profile.from_dict({**data, "s_token": 1.0})
    with pytest.raises(ValueError):
        Profile.from_dict({**data, "a_dec": -1.0})
    assert Profile.from_dict({**data, "_comment": "ignored"}).name == data["name"]


# ---- reproducing the shipped numbers from Vidur's data ----------------------------------------


def test_vidur_refit_reproduces_shipped_profiles(tmp_path):
    if not (DATA_DIR / "vidur_profiles" / "a100_Llama-2-7b-hf_mlp.csv.gz").exists():
        pytest.skip(
            f"Vidur profiles not found under {DATA_DIR}/vidur_profiles "
            "(set ECOSERVE_DATA_DIR to the shared data directory to run this check)"
        )
    from ecoserve_scheduler.sim import fit_vidur

    assert fit_vidur.main(["--data-dir", str(DATA_DIR), "--out", str(tmp_path)]) == 0
    for name in SHIPPED:
        shipped = load_profile(name).to_dict()
        rebuilt = load_profile(tmp_path / (name.replace("/", "_") + ".json")).to_dict()
        assert rebuilt.keys() == shipped.keys()
        for key, value in shipped.items():
            if isinstance(value, float):
                assert math.isclose(rebuilt[key], value, rel_tol=2e-3), (name, key)
            elif key != "sources":
                assert rebuilt[key] == value, (name, key)
        assert rebuilt["sources"].keys() == shipped["sources"].keys()
