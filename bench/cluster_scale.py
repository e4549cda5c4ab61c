"""bench/cluster.py, part 2: one SchedulerCore's plan rate over W simulated workers.

The EcoServe policy with least-loaded placement (timed apart) over W workers, each loaded at about
its sustainable rate: wall time per plan in schedule, placement and apply, plans/s one process
produces, and the plans/s W workers need at their natural step rate.
"""

from __future__ import annotations

import time

import numpy as np
from cluster_report import PROFILE

from ecoserve_scheduler.core.placement import LeastLoaded
from ecoserve_scheduler.sim.engine import SimConfig, simulate_with_log
from ecoserve_scheduler.sim.rl_models import make_rl_model
from ecoserve_scheduler.sim.sweep import Scenario, workload


class TimedLeastLoaded(LeastLoaded):
    """The default placement with a wall-clock meter (the core itself never reads a clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self.calls = 0

    def admits(self, step, r) -> bool:
        t0 = time.perf_counter()
        ok = super().admits(step, r)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return ok


def measure_scale(workers: int, per_worker_rate: float, duration_s: float, data_dir) -> dict:
    rate = per_worker_rate * workers
    n = max(100, int(rate * duration_s))
    sc = Scenario(trace="sharegpt", n=n, profile=PROFILE, data_dir=data_dir)
    records, _ = workload(sc, rate)
    placement = TimedLeastLoaded()
    cfg = SimConfig(policy="ecoserve", num_workers=workers, placement=placement)
    t0 = time.perf_counter()
    run, _, sim = simulate_with_log(records, cfg, sc.cost_model(), make_rl_model("noisy"))
    wall = time.perf_counter() - t0
    plans = len(sim.sched_us)
    sched_s = sum(sim.sched_us) / 1e6
    apply_s = sum(sim.apply_us) / 1e6
    core_s = sched_s + apply_s
    mean_step = float(np.mean(sim.iter_time))
    plans_per_s = plans / core_s
    needed = workers / mean_step
    return {
        "workers": workers,
        "rate_rps": rate,
        "requests": n,
        "plans": plans,
        "plans_per_s": round(plans_per_s, 1),
        "needed_plans_per_s": round(needed, 1),
        "sustains": plans_per_s >= needed,
        "headroom": round(plans_per_s / needed, 2),
        "mean_step_ms": round(mean_step * 1e3, 2),
        "schedule_us_per_plan": round((sched_s - placement.seconds) / plans * 1e6, 1),
        "placement_us_per_plan": round(placement.seconds / plans * 1e6, 1),
        "apply_us_per_plan": round(apply_s / plans * 1e6, 1),
        "schedule_us_p99": round(run.sched_us_per_iter_p99, 1),
        "share": {
            "schedule": round((sched_s - placement.seconds) / core_s, 3),
            "placement": round(placement.seconds / core_s, 3),
            "apply": round(apply_s / core_s, 3),
        },
        "placement_deferrals": placement.deferrals,
        "slo_attainment": round(run.slo_attainment, 4),
        "sim_wall_s": round(wall, 2),
    }
