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
    component switches pipelining/ordering/slo_guard/oracle_rl and the
    components' config fields)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return factory(**options)


def parse_spec(spec: str) -> tuple[str, dict[str, bool | int | float]]:
    """A policy spec as the services take it: a name, optionally with options after a colon,
    `ecoserve:overcommit_share=1.0,slo_guard=false` (values are true/false or numbers)."""
    name, _, rest = spec.partition(":")
    options: dict[str, bool | int | float] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"policy option {item!r} is not key=value (in {spec!r})")
        low = raw.strip().lower()
        if low in ("true", "false"):
            options[key.strip()] = low == "true"
            continue
        try:
            options[key.strip()] = int(low) if low.lstrip("-").isdigit() else float(low)
        except ValueError:
            raise ValueError(f"policy option {key.strip()}={raw!r}: not a number or bool") from None
    return name.strip(), options


def policy_from_spec(spec: str) -> Policy:
    """`make_policy` from a spec string (`parse_spec`); ValueError names what is wrong, an
    unknown option included."""
    name, options = parse_spec(spec)
    try:
        return make_policy(name, **options)
    except TypeError as e:  # the factory's own message names the unexpected option
        raise ValueError(f"policy {spec!r}: {e}") from None


__all__ = ["POLICIES", "Policy", "compose", "make_policy", "parse_spec", "policy_from_spec"]
