"""EcoServe component (a): padded reservation and growth by chunks."""

from __future__ import annotations

import dataclasses

import pytest
from test_policy_components import req

from ecoserve_scheduler.core.policies.reservation import PaddedReservation, ReservationConfig


def test_config_is_frozen_with_the_old_defaults() -> None:
    cfg = ReservationConfig()
    assert (cfg.pad_weight, cfg.extend_min_tokens, cfg.extend_share, cfg.reserve_share) == (
        0.5,
        32,
        0.25,
        0.03,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.pad_weight = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("weight", "padded"), [(0.0, 40), (0.5, 80), (1.0, 120)])
def test_padding_goes_pad_weight_of_the_way_to_the_upper_quantile(weight, padded) -> None:
    rsv = PaddedReservation(ReservationConfig(pad_weight=weight))
    r = req("a", prompt=30, predicted=40, upper=120)
    assert rsv.padded_rl(r) == padded
    assert rsv.admission_tokens(r, 30) == 30 + padded


def test_padding_is_capped_by_max_tokens_and_beyond_what_is_written() -> None:
    rsv = PaddedReservation()
    assert rsv.padded_rl(req("a", predicted=500, upper=600, max_tokens=50)) == 50
    r = req("b", predicted=2)
    r.output_token_ids.extend([1] * 5)
    assert rsv.padded_rl(r) == 6


def test_growth_extends_by_a_chunk_and_rebuckets() -> None:
    rsv = PaddedReservation(ReservationConfig(pad_weight=0.0, extend_min_tokens=32))
    r = req("a", prompt=30, predicted=10)
    r.output_token_ids.extend([1] * 10)
    assert rsv.growth_tokens(r, 41) == 30 + 11 + 32
    assert r.predicted_rl == r.predicted_rl_upper == 11 + 32
    assert rsv.use_reserve and rsv.reserve_share == 0.03 and rsv.headroom_share == 0.0
