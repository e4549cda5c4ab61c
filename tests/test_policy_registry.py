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
    p = make_policy(
        "ecoserve", pad_weight=1.0, slack_quantum_s=2.0, guard_every=3, lend_margin_tokens=5
    )
    assert p.admission.config.pad_weight == 1.0  # type: ignore[attr-defined]
    assert p.queue.slack.config.slack_quantum_s == 2.0  # type: ignore[attr-defined]
    assert p.budget.config.guard_every == 3  # type: ignore[attr-defined]
    assert p.lending.config.lend_margin_tokens == 5  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="nope"):
        make_policy("ecoserve", nope=1)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fcfs")


def test_a_policy_spec_names_a_policy_and_its_options() -> None:
    from ecoserve_scheduler.core import policy_from_spec
    from ecoserve_scheduler.core.policies import parse_spec

    assert parse_spec("ecoserve") == ("ecoserve", {})
    got = parse_spec("ecoserve: overcommit_share=1.5, slo_guard=false,guard_every=3")
    assert got == ("ecoserve", {"overcommit_share": 1.5, "slo_guard": False, "guard_every": 3})
    p = policy_from_spec("ecoserve:overcommit_share=1.5,slo_guard=false")
    assert p.admission.config.overcommit_share == 1.5  # type: ignore[attr-defined]
    assert isinstance(p.budget, FullBudget)
    for bad, why in (
        ("ecoserve:nope=1", "nope"),
        ("ecoserve:pad_weight", "not key=value"),
        ("ecoserve:pad_weight=high", "not a number"),
        ("vllm:pad_weight=1", "pad_weight"),
        ("fcfs", "unknown policy"),
    ):
        with pytest.raises(ValueError, match=why):
            policy_from_spec(bad)


def test_the_scheduler_refuses_a_bad_policy_spec_at_start() -> None:
    from ecoserve_scheduler.live.settings import SchedulerSettings

    with pytest.raises(SystemExit, match="--policy: .*nope"):
        SchedulerSettings.load(["--policy", "ecoserve:nope=1"], environ={})
