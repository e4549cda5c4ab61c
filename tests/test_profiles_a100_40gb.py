"""The A100-40GB profiles: the 80 GB profiles' measured compute with half the memory, so the
KV cache (what the profile format derives from memory) is what binds."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from ecoserve_common.cost import COEFFICIENTS, GIB, CostModel, Profile
from ecoserve_common.plan import BatchShape
from ecoserve_scheduler.sim.cost_model import list_profiles, load_profile

PAIRS = {  # 40 GB profile -> (80 GB profile, KV tokens, blocks of 16) as its description states
    "llama-2-7b/a100-40gb": ("llama-2-7b/a100-80gb", 48_016, 3_001),
    "llama-2-13b/a100-40gb": ("llama-2-13b/a100-80gb", 15_447, 965),
}


def raw(name: str) -> dict:
    path = resources.files("ecoserve_common").joinpath("profiles", name.replace("/", "_") + ".json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", PAIRS)
def test_same_compute_as_the_80gb_profile_with_40_gib(name: str) -> None:
    small, big = load_profile(name), load_profile(PAIRS[name][0])
    assert name in list_profiles() and small.name == name
    assert small.mem_gb == 40.0 and big.mem_gb == 80.0
    for key in (*COEFFICIENTS, "w_mem", "knee_p", "fit_rel_error", "gpu_mem_util", "block_size"):
        assert getattr(small, key) == getattr(big, key), key
    for key in ("n_layers", "hidden", "n_heads", "n_kv_heads", "params_b", "max_model_len"):
        assert getattr(small, key) == getattr(big, key), key
    for key in ("w_mem", "s_tok", "c0", "a_dec", "p_quad", "model"):
        assert small.sources[key] == big.sources[key], key
    shape = BatchShape(((512, 0), (37, 900)), 48, 48 * 700)
    assert CostModel(small).iteration_time(shape) == CostModel(big).iteration_time(shape)
    assert CostModel(small).token_budget() == CostModel(big).token_budget()


@pytest.mark.parametrize("name", PAIRS)
def test_kv_capacity_is_40_gib_times_0_9_minus_weights(name: str) -> None:
    p = load_profile(name)
    tokens, blocks = PAIRS[name][1:]
    per_token = 2 * p.n_layers * p.n_kv_heads * p.head_dim * p.bytes_per_param
    assert p.kv_bytes_per_token == per_token
    expected = int((40 * GIB * 0.9 - p.params_b * 1e9 * p.bytes_per_param) // per_token)
    assert p.kv_capacity_tokens() == expected == tokens
    assert p.num_blocks() == blocks
    big = load_profile(PAIRS[name][0])
    assert big.num_blocks() > 2 * p.num_blocks()  # weights take a larger share of 40 GB
    # The explanation travels with the file: its description field and the sources.
    description = raw(name)["_description"]
    for fact in (f"{tokens:,} tokens", f"{blocks:,} blocks", "0.9", "activation"):
        assert fact in description, fact
    assert f"{tokens:,} tokens" in p.sources["kv_capacity"]
    # A round trip through the strict loader keeps every field (the description is a comment).
    assert Profile.from_dict(raw(name)).to_dict() == p.to_dict()
