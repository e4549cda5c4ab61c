"""The long ShareGPT workloads (sim/workload_long.py): "sharegpt_long" and "sharegpt_multiturn".

Their construction is checked exactly on a small crafted pairs file; the tests on the real data
skip when ../shared/data (or $ECOSERVE_DATA_DIR) lacks the ShareGPT pairs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from ecoserve_scheduler.sim import sweep
from ecoserve_scheduler.sim import workload as w
from ecoserve_scheduler.sim.cost_model import CostModel, load_profile
from ecoserve_scheduler.sim.engine import SimConfig, simulate
from ecoserve_scheduler.sim.rl_models import OracleRL
from ecoserve_scheduler.sim.workload import DataMissing, build_workload
from ecoserve_scheduler.sim.workload_long import (
    LONG_WORKLOADS,
    long_lengths,
    multiturn_lengths,
    pair_columns,
)


def real_data() -> Path:
    folder = w.data_dir()
    if not (folder / w.SHAREGPT_FILE).is_file():
        pytest.skip(
            f"../shared/data absent: {folder / w.SHAREGPT_FILE} not found "
            "(set ECOSERVE_DATA_DIR to the shared data folder to run this test)"
        )
    return folder


def write_pairs(folder: Path, rows: list[tuple]) -> Path:
    """rows: (id, turn, prompt_tokens, response_tokens[, history_tokens])."""
    path = folder / w.SHAREGPT_FILE
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for rid, turn, p, r, *h in rows:
            row = {"id": rid, "turn": turn, "prompt": "x", "response": "y"}
            row |= {"prompt_tokens": p, "response_tokens": r, "history_tokens": h[0] if h else 0}
            f.write(json.dumps(row) + "\n")
    return path


# Out of file order on purpose: a conversation's records join by their numeric split suffix
# (W_9 before W_10), then by turn.
CRAFTED = [
    ("X_0", 0, 10, 20),
    ("X_0", 2, 5, 7),
    ("X_11", 1, 2, 6),
    ("X_0", 4, 3, 4),
    ("X_0", 6, 8, 0),  # no response: not a request, but history for what follows
    ("Y_0", 0, 100, 50),  # a conversation of one pair: no later turn
    ("W_0", 0, 1, 1),
    ("W_10", 1, 1, 3),
    ("W_9", 1, 1, 2),
    ("Z", 0, 1000, 3000),
    ("Z", 2, 500, 1000),  # 4000 tokens of history + 500: capped to 3096 + 1000
]
MULTITURN = [(35, 7), (45, 4), (59, 6), (3, 2), (6, 3), (3096, 1000)]


def test_multiturn_inputs_carry_the_conversation_so_far(tmp_path) -> None:
    cols = pair_columns(write_pairs(tmp_path, CRAFTED))
    inp, out = multiturn_lengths(cols, max_context=4096)
    assert sorted(zip(inp.tolist(), out.tolist(), strict=True)) == sorted(MULTITURN)
    records, src = build_workload("sharegpt_multiturn", 2.0, 6, seed=0, data_dir=tmp_path)
    assert src.startswith("sharegpt_multiturn (") and "6 rows" in src
    got = sorted((r.prompt_tokens, r.output_tokens) for r in records)
    assert got == sorted(MULTITURN)  # n = pool size: drawn without replacement
    assert [r.arrival_s for r in records] == sorted(r.arrival_s for r in records)


def test_long_keeps_rows_at_or_above_the_percentile(tmp_path) -> None:
    rows = [(f"c{i}_0", 0, 50 * i, 50 * i, 0) for i in range(1, 11)]  # totals 100 .. 1000
    rows.append(("big_0", 0, 3000, 3000, 1000))  # 4000 + 3000: capped to 2048 + 2048
    cols = pair_columns(write_pairs(tmp_path, rows))
    inp, out, threshold = long_lengths(cols, max_context=4096)
    assert threshold == pytest.approx(np.percentile([100 * i for i in range(1, 11)] + [4096], 90))
    assert sorted(zip(inp.tolist(), out.tolist(), strict=True)) == [(500, 500), (2048, 2048)]
    records, src = build_workload("sharegpt_long", 1.0, 5, seed=1, data_dir=tmp_path)
    assert "p90" in src and "2 rows" in src
    assert {(r.prompt_tokens, r.output_tokens) for r in records} <= {(500, 500), (2048, 2048)}


@pytest.mark.parametrize("name", LONG_WORKLOADS)
def test_missing_data_raises_even_with_fallback(tmp_path, name: str) -> None:
    assert name in w.WORKLOADS
    with pytest.raises(DataMissing, match="not found"):
        build_workload(name, 1.0, 10, seed=0, data_dir=tmp_path, fallback=True)
    sc = sweep.Scenario(trace=name, n=10, data_dir=str(tmp_path))
    with pytest.raises(DataMissing):
        sweep.workload(sc, 1.0)


# ---- on the real ShareGPT pairs ------------------------------------------------------------


def test_real_sharegpt_long_is_the_top_tenth() -> None:
    folder = real_data()
    cols = pair_columns(folder / w.SHAREGPT_FILE)
    inp, out, threshold = long_lengths(cols, 4096)
    valid = int(np.sum((cols.history + cols.prompt > 0) & (cols.response > 0)))
    assert 0.09 * valid <= len(inp) <= 0.12 * valid
    assert np.all(inp + out >= threshold) and np.all(inp + out <= 4096)
    sc = sweep.Scenario(trace="sharegpt_long", n=400, seed=4)
    records, src = sweep.workload(sc, 2.0)
    assert src.startswith("sharegpt_long (") and "poisson arrivals at 2 req/s" in src
    assert records == build_workload("sharegpt_long", 2.0, 400, seed=4)[0]
    plain, _ = build_workload("sharegpt", 2.0, 400, seed=4)
    total = np.mean([r.prompt_tokens + r.output_tokens for r in records])
    assert total >= threshold >= 1.5 * np.mean([r.prompt_tokens + r.output_tokens for r in plain])


def test_real_sharegpt_multiturn_is_longer_than_sharegpt() -> None:
    folder = real_data()
    cols = pair_columns(folder / w.SHAREGPT_FILE)
    inp, out = multiturn_lengths(cols, 4096)
    assert 30_000 < len(inp) < len(cols.prompt)  # every conversation's first pair is left out
    assert np.all(inp >= 1) and np.all(out >= 1) and np.all(inp + out <= 4096)
    records, src = build_workload("sharegpt_multiturn", 2.0, 1000, seed=5, data_dir=folder)
    plain, _ = build_workload("sharegpt", 2.0, 1000, seed=5, data_dir=folder)
    mean_in = np.mean([r.prompt_tokens for r in records])
    assert mean_in > 1.2 * np.mean([r.prompt_tokens for r in plain])


def test_real_long_workload_binds_the_kv_cache_of_a_40gb_a100() -> None:
    """On-demand paging (vLLM v1) over long requests on 13B / 40 GB: the cache stays nearly full
    and it preempts over and over (1,275 times for 120 requests here); the same trace on 80 GB
    preempts far less (107) with less of the cache held."""
    real_data()
    records, _ = build_workload("sharegpt_long", 1.5, 120, seed=6)
    runs = {}
    for mem in ("40", "80"):
        cost = CostModel(load_profile(f"llama-2-13b/a100-{mem}gb"))
        runs[mem] = simulate(records, SimConfig(policy="vllm"), cost, OracleRL())[0]
    assert runs["40"].finished == runs["80"].finished == 120
    assert runs["40"].preemptions > 0 and runs["40"].kv_reserved_share > 0.6
    assert runs["80"].kv_reserved_share < runs["40"].kv_reserved_share
    assert 5 * runs["80"].preemptions < runs["40"].preemptions
