"""EcoServe (b): KVC pipelining, lending a decoding host's unused reservation tail.

When fresh blocks are short, a prompt task may borrow the unused tail of a decoding host's
reservation if the host, at one token per iteration, cannot reach that tail before the guest's
padded finish (+ `lend_margin_tokens`). At most `max_hosts_scanned` hosts are looked at, most
recently admitted first (they have the longest tails). Each iteration the core moves a guest
away (fresh blocks, reserve) or preempts it once its host is within `collision_lookahead`
tokens of the loan, before the host writes there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..request import Request
from ..step import Step


@dataclass(frozen=True)
class LendingConfig:
    lend_margin_tokens: int = 16
    collision_lookahead: int = 2
    max_hosts_scanned: int = 64


class KVLending:
    """The `Lending` hook of EcoServe. `reserved_rl(r)`: the response length r reserves for
    (the reservation component's padded prediction), which bounds how long a guest stays."""

    def __init__(self, config: LendingConfig, reserved_rl: Callable[[Request], int]) -> None:
        self.config = config
        self.collision_lookahead = config.collision_lookahead
        self.reserved_rl = reserved_rl

    def lend(self, step: Step, r: Request, blocks: int) -> bool:
        cfg, ledger, budget = self.config, step.ledger, step.spec.token_budget
        guest_iters = -(-r.pending // budget) + self.reserved_rl(r) - r.num_output
        reach = guest_iters + cfg.lend_margin_tokens + cfg.collision_lookahead
        scanned = 0
        for host in reversed(step.running.values()):  # recent hosts have the longest tails
            if scanned >= cfg.max_hosts_scanned:
                break
            if host.pending != 1 or ledger.is_guest(host.request_id):
                continue  # only decoding owners advance one token per iteration
            scanned += 1
            min_start = ledger.blocks_for(ledger.written(host.request_id) + reach)
            if ledger.lendable(host.request_id, min_start) >= blocks:
                ledger.lend(host.request_id, r.request_id, blocks, min_start)
                return True
        return False


__all__ = ["KVLending", "LendingConfig"]
