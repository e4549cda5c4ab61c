"""The policy registry: names, the baselines' hook compositions, EcoServe's compositions."""

from __future__ import annotations

import pytest

from ecoserve_scheduler.core import POLICIES, make_policy
from ecoserve_scheduler.core.policies import compose
from ecoserve_scheduler.core.policies.base import FullBudget, NoLending, OnDemand
from ecoserve_scheduler.core.policies.guard import SloGuard
from ecoserve_scheduler.core.policies.lending import KVLending
from ecoserve_scheduler.core.policies.slack import ArrivalOrder, SlackOrder


def test_the_same_names_as_ever() -> None:
    assert set(POLICIES) == {"ecoserve", "vllm", "vllm-v0", "sarathi", "orca", "sjf"}
    for name in POLICIES:
        assert make_policy(name).name == name


def test_baselines() -> None:
    assert make_policy("vllm").admission == OnDemand(headroom_share=0.01)
    assert not make_policy("orca").chunked and make_policy("sarathi").chunked
    assert isinstance(make_policy("sjf").lending, NoLending)


def test_ecoserve_is_all_components_and_ablations_leave_one_out() -> None:
    p = make_policy("ecoserve")
    assert isinstance(p.queue, SlackOrder) and isinstance(p.lending, KVLending)
    assert isinstance(p.budget, SloGuard) and p.reserve_share == 0.03
    assert isinstance(make_policy("ecoserve", pipelining=False).lending, NoLending)
    assert isinstance(make_policy("ecoserve", slo_guard=False).budget, FullBudget)
    assert isinstance(make_policy("ecoserve", ordering=False).queue, ArrivalOrder)
    assert make_policy("ecoserve", oracle_rl=True).wants_oracle_rl
    assert isinstance(compose(lending=None).lending, NoLending)


def test_old_keywords_map_onto_component_configs() -> None:
    p = make_policy("ecoserve", pad_weight=1.0, group_size=4, guard_every=3, lend_margin_tokens=5)
    assert p.admission.config.pad_weight == 1.0  # type: ignore[attr-defined]
    assert p.queue.queue.config.group_size == 4  # type: ignore[attr-defined]
    assert p.budget.config.guard_every == 3  # type: ignore[attr-defined]
    assert p.lending.config.lend_margin_tokens == 5  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="nope"):
        make_policy("ecoserve", nope=1)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fcfs")
