"""Policy registry: each scheduling policy is a small module building a `Policy` of hooks."""

from __future__ import annotations

from collections.abc import Callable

from .base import Policy
from .ecoserve import compose, ecoserve_policy
from .orca import orca_policy
from .sarathi import sarathi_policy
from .sjf import sjf_policy
from .vllm import vllm_policy
from .vllm_v0 import vllm_v0_policy

POLICIES: dict[str, Callable[..., Policy]] = {
    "ecoserve": ecoserve_policy,
    "vllm": vllm_policy,
    "vllm-v0": vllm_v0_policy,
    "sarathi": sarathi_policy,
    "orca": orca_policy,
    "sjf": sjf_policy,
}


def make_policy(name: str, **options: object) -> Policy:
    """A fresh policy; options are the policy's own keyword arguments (for "ecoserve": the
    component switches pipelining/synced_groups/ordering/slo_guard/oracle_rl and the
    components' config fields)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return factory(**options)


__all__ = ["POLICIES", "Policy", "compose", "make_policy"]
