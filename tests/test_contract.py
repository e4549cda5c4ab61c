"""The contract package: generated code current, one validation of sampling parameters, ids."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ecoserve_common.ids import check_request_id, new_request_id
from ecoserve_common.sampling import MAX_SEED, InvalidSampling, SamplingParams

REPO = Path(__file__).resolve().parents[1]
PB = REPO / "services/common/ecoserve_common/pb"


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools absent")
def test_checked_in_code_matches_the_protos(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run([str(REPO / "services/common/gen_proto.sh"), str(tmp_path)], check=True, env=env)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(
        p.name for p in PB.iterdir() if p.name != "__init__.py" and p.name != "__pycache__"
    )
    for name in generated:
        assert (tmp_path / name).read_text() == (PB / name).read_text(), f"{name}: make proto"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED + 1}, "seed"),
        ({"top_k": 2**32}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ],
)
def test_bad_sampling_is_refused_naming_the_field(fields, field):
    with pytest.raises(InvalidSampling) as exc:
        SamplingParams.checked(**fields)
    assert exc.value.field == field and field in str(exc.value)


def test_good_sampling_passes_and_keeps_its_values():
    p = SamplingParams.checked(
        max_tokens=7, temperature=0.7, top_k=40, seed=MAX_SEED, top_p=0.9, stop_token_ids=[2, 3]
    )
    assert (p.max_tokens, p.top_k, p.seed, p.stop_token_ids) == (7, 40, MAX_SEED, (2, 3))


def test_request_ids_are_fresh_and_checked():
    a, b = new_request_id("cmpl-"), new_request_id("cmpl-")
    assert a != b and a.startswith("cmpl-") and check_request_id(a) is None
    assert check_request_id("") and check_request_id("a" * 500) and check_request_id("a b\n")
