"""EcoServe (a): exact reservation of the predicted response length, padded; growth by chunks.

A prompt task reserves prompt + padded predicted response length: the point prediction plus
`pad_weight` of the way to the predictor's upper (p90) quantile. Measured (ShareGPT, noisy RL,
bench/sim.py ablation): the full p90 (1.0) is best when compute binds (7B/A100) and the bare
point (0.0) when KV binds (13B/A100, where 1.0 cost ~8% of the max rate and 3x the p99 TTFT);
0.5 is within a step of the best in both. Under-prediction extends by a chunk
(`extend_min_tokens`, or `extend_share` of the output so far) from free blocks, then from the
reserve pool (`reserve_share` of the blocks), and only then preempts a victim.

Overcommit (our addition): when the cache is full of reservations, a request that has not yet
had a first token and carries a TTFT target joins on demand anyway (its first chunk's blocks,
growing by what it needs later), while the projected peak of KV use (`projected_peak`: each
running request growing to its padded length, then freeing) stays within (1 +
`overcommit_share`) x the cache. Reservations are upper bounds (padded, and each is released
as soon as its request finishes), so the cache is rarely as full as they claim;
without it a burst larger than the cache waits whole answers for its first tokens (live, on
SmolLM2: TTFT p99 7-14 s from 5.7 req/s, results/peer). If the bet loses, the victim hook
preempts the request with the most slack (slack.py: a TPOT target lets a decoding request
pause as long as its mean TPOT holds); it waits in slack order and comes back through a
reservation, so only first admissions overcommit and nothing cycles. New bets go on while a
victim waits: holding them until it was back (as before) cost the simulator's KV-bound cells
up to a quarter of their max rate (multi-turn 13B/A100-40GB, TTFT/TPOT: 0.343 -> 0.422 req/s
without the hold, bench/sim.py --quick), and readmitting victims on demand too was worse
(0.229).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..request import Request
from ..step import Step


@dataclass(frozen=True)
class ReservationConfig:
    pad_weight: float = 0.5
    extend_min_tokens: int = 32
    extend_share: float = 0.25
    reserve_share: float = 0.03
    overcommit_share: float = 0.5
    pass_victims: bool = False  # see core/admit.py


class PaddedReservation:
    """The `Admission` hook of EcoServe."""

    headroom_share = 0.0
    use_reserve = True

    def __init__(self, config: ReservationConfig | None = None) -> None:
        self.config = config or ReservationConfig()
        self.reserve_share = self.config.reserve_share

    @property
    def passes_victims(self) -> bool:
        return self.config.pass_victims

    def padded_rl(self, r: Request) -> int:
        """Response length to reserve for: point + pad_weight * (upper - point), within
        max_tokens and beyond what is already written."""
        want = r.predicted_rl + self.config.pad_weight * (r.predicted_rl_upper - r.predicted_rl)
        return max(min(int(want + 0.5), r.sampling.max_tokens), r.num_output + 1)

    def admission_tokens(self, r: Request, n: int) -> int:
        return max(r.prompt_len + self.padded_rl(r), r.num_computed + n)

    def overcommits(self, step: Step, r: Request) -> bool:
        share = self.config.overcommit_share
        if share <= 0 or r.num_output or r.slo.ttft_s is None:
            return False  # a victim (it has outputs) comes back through a reservation
        ledger = step.ledger
        return self.projected_peak(step, r) <= (1 + share) * (
            ledger.num_blocks - ledger.reserve_blocks
        )

    def projected_peak(self, step: Step, r: Request) -> int:
        """Blocks the running requests and r will hold at the worst moment ahead if each writes
        a token a step until its padded length and then frees everything: the usage just
        before each one ends, the largest of these (requests end at different times, so this
        is below the sum of their reservations)."""
        ledger = step.ledger
        runs = [  # (tokens to go, tokens held once its prompt is in)
            (self.padded_rl(o) - o.num_output, o.prompt_len + o.num_output)
            for o in step.running.values()
        ]
        runs.append((self.padded_rl(r), r.prompt_len))
        runs.sort()
        held = sum(w for _, w in runs)
        peak, n = 0, len(runs)
        for k, (left, written) in enumerate(runs):  # at step `left`, runs[k:] still hold KV
            peak = max(peak, held + (n - k) * left)
            held -= written
        return ledger.blocks_for(peak) + n  # + n: each table's last block is partly empty

    def growth_tokens(self, r: Request, need: int) -> int:
        """Under-prediction: extend by a chunk and re-bucket r to its new padded length."""
        if r.on_demand:
            return need  # overcommitted: no reservation to restore
        cfg = self.config
        cap = r.prompt_len + r.sampling.max_tokens
        chunk = max(cfg.extend_min_tokens, int(cfg.extend_share * r.num_output))
        target = min(max(need, r.prompt_len + self.padded_rl(r)) + chunk, cap)
        # Re-bucket: the request's prediction becomes what it has now reserved.
        r.predicted_rl = r.predicted_rl_upper = max(r.predicted_rl_upper, target - r.prompt_len)
        return max(target, need)


__all__ = ["PaddedReservation", "ReservationConfig"]
