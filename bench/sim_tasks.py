"""bench/sim.py's work in the process pool: searches and runs (top-level functions: they pickle).

A task gets the scenarios of one trace x profile cell keyed by SLO definition (each Scenario
carries its `SloSpec`). A policy that never reads the SLO (`SLO_BLIND`) is simulated once per
rate and that run is scored under every definition given (`sweep.evaluate`); an SLO-aware one
(EcoServe) gets one definition per task, since the SLO changes its schedule.
"""

from __future__ import annotations

import math
import time

from ecoserve_scheduler.sim.sweep import (
    Scenario,
    evaluate,
    round_rate,
    search_max_rate,
    simulate_at,
    workload,
)
from ecoserve_scheduler.sim.workload import DataMissing


class _Cell:
    """Runs of one policy on one cell, cached by rate: metrics and a verdict per definition."""

    def __init__(self, scs: dict[str, Scenario], policy: str, options: dict, jcts_at=None):
        self.scs, self.policy, self.options = scs, policy, options
        self.first = next(iter(scs))
        self.cost = scs[self.first].cost_model()
        self.runs: dict[float, dict] = {}
        self.jcts_at = None if jcts_at is None else round_rate(jcts_at)
        self.jcts: list[float] | None = None

    def at(self, rate: float) -> dict:
        rate = round_rate(rate)
        if rate not in self.runs:
            sc = self.scs[self.first]
            metrics, per = simulate_at(sc, self.policy, rate, self.options)
            evals = {
                name: evaluate(s.slo_spec(), per, self.cost, s.seed, metrics.duration_s)
                for name, s in self.scs.items()
            }
            self.runs[rate] = {"metrics": metrics.as_dict(), "evals": evals}
            if rate == self.jcts_at:
                # Unfinished requests never complete: infinite JCT (the CDF stays below 1).
                self.jcts = [m.jct_s if m.jct_s is not None else math.inf for m in per]
        return self.runs[rate]


def search_task(
    scs: dict[str, Scenario],
    policy: str,
    options: dict,
    guesses: dict[str, float | None],
    search: tuple[float, float, float, float],
    extra_rates: tuple[float, ...] = (),
    jcts_at: float | None = None,
):
    """max_rate_at_slo90 under each definition in `scs` (in order; a definition without a guess
    starts from the previous one's answer), then runs at `extra_rates` (the common rate).

    Returns ("ok", {"searches": {slo: {"rate", "tried": {rate: attainment}}}, "runs": {rate:
    {"metrics", "evals"}}, "jcts", "wall_s"}) or ("skipped", reason) without the data."""
    t0 = time.perf_counter()
    target, lo, hi, rel_tol = search
    try:
        cell = _Cell(scs, policy, options, jcts_at)
        searches: dict[str, dict] = {}
        prev = None
        for name in scs:
            guess = guesses.get(name) or prev

            def attain(rate: float, name: str = name) -> float:
                return cell.at(rate)["evals"][name]["slo_attainment"]

            rate, tried = search_max_rate(attain, target, lo, hi, rel_tol, guess=guess)
            searches[name] = {"rate": rate, "tried": tried}
            prev = rate or prev
        for r in extra_rates:
            cell.at(r)
    except DataMissing as e:
        return "skipped", str(e)
    wall = time.perf_counter() - t0
    return "ok", {"searches": searches, "runs": cell.runs, "jcts": cell.jcts, "wall_s": wall}


def run_task(scs: dict[str, Scenario], policy: str, options: dict, rate: float, jcts: bool):
    """One run at `rate`, scored under every definition in `scs`."""
    try:
        cell = _Cell(scs, policy, options, rate if jcts else None)
        out = cell.at(rate)
    except DataMissing as e:
        return "skipped", str(e)
    return "ok", {**out, "jcts": cell.jcts}


def source_task(sc: Scenario, rate: float):
    try:
        return "ok", workload(sc, rate)[1]
    except DataMissing as e:
        return "skipped", str(e)
