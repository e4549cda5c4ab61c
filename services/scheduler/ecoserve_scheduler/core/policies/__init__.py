"""Policy registry: each scheduling policy is one small module, picked by name."""

from __future__ import annotations

from .base import Policy
from .ecoserve import EcoServePolicy
from .orca import OrcaPolicy
from .sarathi import SarathiPolicy
from .sjf import SJFPolicy
from .vllm import VLLMPolicy

POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (EcoServePolicy, VLLMPolicy, SarathiPolicy, OrcaPolicy, SJFPolicy)
}


def make_policy(name: str, **options) -> Policy:
    """A fresh policy instance; options are the policy's own keyword arguments."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return cls(**options)


__all__ = ["POLICIES", "Policy", "make_policy"]
