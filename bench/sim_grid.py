"""bench/sim.py's grid: trace x profile x SLO definition x policy, searched in the process pool.

Order of work: per trace x profile cell, the baseline (vLLM) searches all SLO definitions from
`lo`; its `jct` answer is the cell's common rate. Every other search then starts from the
baseline's answer for the same definition (`sweep.search_max_rate`'s guess), which brackets in
~2 runs instead of ~4 doublings, and runs at the common rate too. SLO-blind policies search all
definitions in one task over one cache of runs (a run scored under every definition).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sim_report import (
    ABLATION_CELLS,
    ABLATIONS,
    BASELINE,
    RATIO_PAIRS,
    SLO_BLIND,
    SWEEP_FACTORS,
    SWEEP_TRACES,
    TARGET,
    TPOT_X,
    TTFT_X,
    TWO_CLASS,
    VARIANTS,
    ratio_key,
)
from sim_tasks import run_task, search_task

from ecoserve_scheduler.core.policies import POLICIES as REGISTERED
from ecoserve_scheduler.sim.cost_model import CostModel, load_profile
from ecoserve_scheduler.sim.sweep import (
    Scenario,
    SloClass,
    SloSpec,
    round_rate,
    ttft_tpot_targets,
    workload,
)
from ecoserve_scheduler.sim.workload import WORKLOADS, DataMissing

TARGETS_RULE = (
    f"DistServe-style goodput targets per trace x profile: TTFT <= {TTFT_X:g} x the unloaded TTFT "
    f"(chunked prefill alone) of the trace's median prompt, TPOT <= {TPOT_X:g} x the unloaded TPOT "
    "(batch-1 decode) of a request with the median prompt and the median output. DistServe sets "
    "per-application targets near what a user tolerates (its chatbot on OPT-13B: TTFT 0.25 s, "
    "TPOT 0.1 s), a few times the unloaded latency on its GPU; the same multiple (5) as the JCT "
    "SLO keeps the two definitions comparably strict at low load. The median request, not the "
    "mean, because the long tail of prompts would loosen the TTFT target for everyone; a prompt "
    "far above the median can miss TTFT even unloaded (ShareGPT: only the longest ~0.5%)."
)
TWO_CLASS_RULE = (
    "Two classes by a seeded coin per request (the same request keeps its class at every rate "
    "and for every policy): "
    + "; ".join(f"{n} {s:.0%}: TTFT x{a:g}, TPOT x{b:g}" for n, s, a, b in TWO_CLASS)
    + " of the single-class targets. Interactive requests keep the ttft-tpot targets; batch "
    "ones tolerate a 10x later first token and 2x slower tokens (DistServe's summarization "
    "vs chatbot targets differ by about that much), so a scheduler that knows the SLO can let "
    "batch requests wait."
)


def policy_of(name: str) -> tuple[str, dict]:
    return VARIANTS.get(name, (name, {}))


def slo_specs(cost: CostModel, ref_p: int, ref_o: int, k: float) -> tuple[dict, dict]:
    """The SLO definitions of one trace x profile cell and the targets behind them."""
    ttft, tpot = ttft_tpot_targets(cost, ref_p, ref_o, TTFT_X, TPOT_X)
    classes = tuple(SloClass(n, s, ttft * a, tpot * b) for n, s, a, b in TWO_CLASS)
    specs = {
        "jct": SloSpec("jct", "jct", k),
        "ttft-tpot": SloSpec("ttft-tpot", "ttft-tpot", k, (SloClass("all", 1.0, ttft, tpot),)),
        "two-class": SloSpec("two-class", "ttft-tpot", k, classes),
    }
    targets = {
        "ref_prompt_tokens": ref_p,
        "ref_output_tokens": ref_o,
        "unloaded_ttft_s": round(ttft / TTFT_X, 6),
        "unloaded_tpot_s": round(tpot / TPOT_X, 6),
        "ttft_s": round(ttft, 6),
        "tpot_s": round(tpot, 6),
        "two_class": {c.name: {"share": c.share, "ttft_s": round(c.ttft_s, 6),
                               "tpot_s": round(c.tpot_s, 6)} for c in classes},
    }  # fmt: skip
    return specs, targets


@dataclass
class Cell:
    trace: str
    profile: str
    primary: bool
    policies: tuple[str, ...]
    scs: dict[str, Scenario]  # SLO definition -> scenario
    targets: dict
    common: float | None = None
    base: dict[str, float] = field(default_factory=dict)  # baseline's rate per definition
    got: dict[tuple[str, str], dict] = field(default_factory=dict)  # (policy, slo) -> search


def resolve(cfg, skipped: dict) -> tuple[list[Cell], dict[str, str]]:
    """The cells to run, noting unregistered policies and profiles and missing traces."""
    others = cfg.other_policies if len(cfg.profiles) > 1 else ()
    for p in dict.fromkeys(cfg.policies + others):
        if policy_of(p)[0] not in REGISTERED:
            skipped["policies"][p] = f"policy {policy_of(p)[0]!r} is not registered (core.policies)"
    profiles = []
    for prof in cfg.profiles:
        try:
            profiles.append((prof, load_profile(prof)))
        except KeyError as e:
            skipped["profiles"][prof] = str(e).strip("'\"")
    cells, trace_skips = [], {}
    for trace in cfg.traces:
        if trace not in WORKLOADS:
            trace_skips[trace] = skipped["traces"][trace] = f"workload {trace!r} is not registered"
            continue
        for i, (prof, profile) in enumerate(profiles):
            base = cfg.scenario(trace, prof)
            try:
                records, _ = workload(base, 1.0)
            except (DataMissing, ValueError) as e:
                trace_skips[trace] = skipped["traces"][trace] = str(e)
                break
            cap = profile.max_model_len - 1
            ref_p = int(np.median([min(r.prompt_tokens, cap) for r in records]))
            ref_o = int(np.median([r.output_tokens for r in records]))
            specs, targets = slo_specs(CostModel(profile), ref_p, ref_o, cfg.slo_k)
            scs = {s: replace(base, slo=specs[s]) for s in cfg.slos}
            names = cfg.policies if i == 0 else cfg.other_policies
            pols = tuple(p for p in names if p not in skipped["policies"])
            cells.append(Cell(trace, prof, i == 0, pols, scs, targets))
    return cells, trace_skips


def run_grid(cfg, runner, progress) -> dict[str, Any]:
    """Submit and collect every task; returns the cells (with their searches), the skips, the
    sweep, the common-rate JCTs for the CDF plots and the ablation searches."""
    skipped: dict[str, dict[str, str]] = {"policies": {}, "profiles": {}, "traces": {}}
    cells, trace_skips = resolve(cfg, skipped)
    params = (TARGET, cfg.lo, cfg.hi, cfg.rel_tol)
    by_key = {(c.trace, c.profile): c for c in cells}
    sweep: dict[str, dict] = {}
    jcts: dict[tuple[str, str], list[float]] = {}
    ablation: dict[str, dict] = {}

    def baseline(c: Cell) -> str:
        return BASELINE if BASELINE in c.policies else c.policies[0]

    def submit_search(c: Cell, p: str, slos: tuple[str, ...], guesses: dict, extra=(), cdf=False):
        name, opts = policy_of(p)
        scs = {s: c.scs[s] for s in slos}
        jcts_at = c.common if cdf and "jct" in slos else None
        key = ("search", c.trace, c.profile, p, ",".join(slos))
        runner.submit(key, search_task, scs, name, opts, guesses, params, extra, jcts_at)

    def slo_groups(p: str) -> list[tuple[str, ...]]:
        slos = tuple(c_slos)
        return [slos] if p in SLO_BLIND else [(s,) for s in slos]

    c_slos = cfg.slos
    first_slo = "jct" if "jct" in c_slos else c_slos[0]  # its baseline answer: the common rate
    for c in cells:
        if c.policies:
            for slos in slo_groups(baseline(c)):
                submit_search(c, baseline(c), slos, {})

    def on_common(c: Cell) -> None:
        cdf = cfg.plots and c.primary
        for p in c.policies:
            if p == baseline(c):
                if cdf and "jct" in c.scs:
                    name, opts = policy_of(p)
                    args = ({"jct": c.scs["jct"]}, name, opts, c.common, True)
                    runner.submit(("cdf", c.trace, c.profile, p), run_task, *args)
                continue
            for slos in slo_groups(p):
                submit_search(c, p, slos, {s: c.base.get(s) for s in slos}, (c.common,), cdf)
        if cfg.sweep and c.primary and c.trace in SWEEP_TRACES:
            sweep[c.trace] = {s: {} for s in c_slos}
            for f in SWEEP_FACTORS:
                r = round_rate(f * c.common)
                for p in c.policies:
                    name, opts = policy_of(p)
                    for slos in slo_groups(p):
                        scs = {s: c.scs[s] for s in slos}
                        key = ("sweep", c.trace, c.profile, p, ",".join(slos), r)
                        runner.submit(key, run_task, scs, name, opts, r, False)
        for a_trace, a_profile, slo in ABLATION_CELLS:
            here = c.profile == a_profile if a_profile else c.primary
            if not (cfg.ablation and here and c.trace == a_trace and slo in c.scs):
                continue
            if "ecoserve" not in c.policies:
                continue
            oracle = VARIANTS["ecoserve-oracle"][1]
            for vname, opts in ABLATIONS.items():
                if not opts or (opts == oracle and "ecoserve-oracle" in c.policies):
                    continue  # the ecoserve and ecoserve-oracle columns
                args = ({slo: c.scs[slo]}, "ecoserve", opts, {slo: c.base.get(slo)})
                key = ("ablation", c.trace, c.profile, vname, slo)
                runner.submit(key, search_task, *args, params, (c.common,), None)

    while runner:
        key, (status, payload) = runner.next()
        progress.done(" ".join(str(k) for k in key))
        kind, trace, profile = key[0], key[1], key[2]
        c = by_key[(trace, profile)]
        if status == "skipped":
            trace_skips.setdefault(trace, payload)
            continue
        if kind == "search":
            p, slos = key[3], key[4].split(",")
            for s in slos:
                c.got[(p, s)] = {**payload["searches"][s], "runs": payload["runs"],
                                 "wall_s": payload["wall_s"]}  # fmt: skip
            if payload["jcts"] is not None:
                jcts[(trace, p)] = payload["jcts"]
            if p == baseline(c):
                c.base.update({s: payload["searches"][s]["rate"] for s in slos})
                if c.common is None and first_slo in slos:
                    rate = c.base[first_slo]
                    tried = payload["searches"][first_slo]["tried"]
                    c.common = rate if rate > 0 else min(tried)
                    on_common(c)
        elif kind == "cdf":
            jcts[(trace, key[3])] = payload["jcts"]
        elif kind == "sweep":
            p, slos, r = key[3], key[4].split(","), key[5]
            for s in slos:
                m = {**payload["metrics"], **payload["evals"][s]}
                sweep[trace][s].setdefault(p, {})[f"{r:.6g}"] = m
        elif kind == "ablation":
            got = {**payload["searches"][key[4]], "runs": payload["runs"]}
            ablation.setdefault((trace, profile), {})[key[3]] = got
    return {
        "cells": cells,
        "skipped": skipped,
        "trace_skips": trace_skips,
        "sweep": sweep,
        "jcts": jcts,
        "ablation": ablation,
    }


def _ratio(a, b) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return round(a / b, 4)


def cell_summary(c: Cell) -> dict:
    """{slo: {policy: entry, "_ratios", "_search"}} plus the cell's metadata."""
    out: dict[str, Any] = {"_common_rate": c.common, "_slo_targets": c.targets}
    try:
        out["_workload"] = workload(c.scs[next(iter(c.scs))], c.common)[1]
    except (DataMissing, ValueError) as e:  # pragma: no cover - resolved before
        out["_workload"] = str(e)
    common = round_rate(c.common)
    for s in c.scs:
        t: dict[str, Any] = {}
        tried, walls = {}, {}
        for p in c.policies:
            g = c.got.get((p, s))
            if g is None:
                continue
            run = g["runs"].get(common)
            entry: dict[str, Any] = {"max_rate_at_slo90": g["rate"]}
            if run is not None:
                entry.update(run["metrics"])
                entry.update(run["evals"][s])
            at_max = g["runs"].get(g["rate"])
            if at_max is not None:
                entry["at_max_rate"] = at_max["evals"][s]
            t[p] = entry
            tried[p] = {f"{r:.6g}": round(a, 4) for r, a in sorted(g["tried"].items())}
            walls[p] = round(g["wall_s"], 3)
        ratios = {ratio_key(a, b): _ratio(t[a]["max_rate_at_slo90"], t[b]["max_rate_at_slo90"])
                  for a, b in RATIO_PAIRS if a in t and b in t}  # fmt: skip
        if "ecoserve" in t and "vllm" in t:
            ratios["mean_jct_ecoserve_over_vllm"] = _ratio(
                t["ecoserve"].get("mean_jct_s"), t["vllm"].get("mean_jct_s")
            )
        t["_ratios"] = ratios
        t["_search"] = {
            "target": TARGET,
            "common_rate_policy": BASELINE if BASELINE in c.policies else c.policies[0],
            "attainment_by_rate": tried,
            "search_wall_s": walls,
        }
        out[s] = t
    return out


def ablation_summary(c: Cell, abl: dict, slo: str = "jct") -> dict:
    e = c.got.get(("ecoserve", slo))
    o = c.got.get(("ecoserve-oracle", slo))
    common = round_rate(c.common)
    variants = {}
    for name, opts in ABLATIONS.items():
        g = e if not opts else abl.get(name)
        if g is None and opts == VARIANTS["ecoserve-oracle"][1]:
            g = o
        if g is None:
            continue
        run = g["runs"].get(common)
        m = {**run["metrics"], **run["evals"][slo]} if run else {}
        variants[name] = {"options": opts, "max_rate_at_slo90": g["rate"]}
        for k in ("mean_jct_s", "p99_ttft_s", "slo_attainment", "preemptions", "goodput_rps"):
            variants[name][k] = m.get(k)
    return {
        "trace": c.trace,
        "profile": c.profile,
        "slo": slo,
        "common_rate": c.common,
        "variants": variants,
    }
