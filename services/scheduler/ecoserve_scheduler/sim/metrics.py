"""Metrics as DESIGN.md section 4 defines them, the same way for every policy."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..core import Request, Status


@dataclass(frozen=True)
class RequestMetrics:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    finished: bool
    ttft_s: float | None
    tpot_s: float | None
    jct_s: float | None
    normalized_latency_s: float | None  # JCT / output tokens
    slo_met: bool
    preemptions: int

    @classmethod
    def of(cls, r: Request) -> RequestMetrics:
        finished = r.status is Status.FINISHED and r.finished_s is not None
        n = r.num_output
        ttft = r.first_token_s - r.arrival_s if r.first_token_s is not None else None
        jct = r.finished_s - r.arrival_s if finished else None
        tpot = (r.finished_s - r.first_token_s) / (n - 1) if finished and n > 1 else None
        met = finished and r.finished_s <= r.slo.jct_deadline_s + 1e-9
        if met and r.slo.ttft_s is not None:
            met = ttft is not None and ttft <= r.slo.ttft_s
        if met and r.slo.tpot_s is not None and tpot is not None:
            met = tpot <= r.slo.tpot_s
        return cls(
            r.request_id,
            r.arrival_s,
            r.prompt_len,
            n,
            finished,
            ttft,
            tpot,
            jct,
            jct / n if jct is not None and n else None,
            met,
            r.preemptions,
        )


@dataclass(frozen=True)
class RunMetrics:
    requests: int
    finished: int
    duration_s: float  # first arrival to last finish
    throughput_rps: float
    output_tok_s: float
    goodput_rps: float
    slo_attainment: float
    mean_jct_s: float
    p50_jct_s: float
    p99_jct_s: float
    mean_ttft_s: float
    p99_ttft_s: float
    mean_tpot_s: float
    p99_tpot_s: float
    mean_norm_latency_s: float
    kv_reserved_share: float  # blocks reserved / total, time-weighted over iterations
    kv_written_share: float  # tokens written / tokens of reserved blocks, time-weighted
    kv_reserved_share_max: float  # the largest blocks reserved / total at any iteration
    kv_used_share: float  # tokens written / KV capacity in tokens, time-weighted
    kv_used_share_max: float
    compute_util: float  # tokens per iteration / token budget
    iterations: int
    preemptions: int  # preemption events
    preempted_requests: int  # requests preempted at least once
    extensions: int
    loans: int
    guest_moves: int
    sched_us_per_iter_p50: float
    sched_us_per_iter_p99: float
    apply_us_per_iter_p99: float

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _pct(xs, q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _mean_or_zero(xs, weights) -> float:
    """Weighted mean; 0.0 when there is nothing to average (or no weight per value)."""
    if not len(xs) or len(xs) != len(weights):
        return 0.0
    return float(np.average(xs, weights=weights))


def meets(
    m: RequestMetrics,
    jct_s: float | None = None,
    ttft_s: float | None = None,
    tpot_s: float | None = None,
) -> bool:
    """Whether a finished request's latencies are within the given bounds (None: no bound),
    judged as `RequestMetrics.of` judges the SLO a run carried: JCT <= jct_s (up to 1e-9 s),
    TTFT <= ttft_s, and TPOT <= tpot_s when it has a TPOT (one output token has none). So one
    run of a policy that never reads the SLO can be scored under several SLO definitions."""
    if not m.finished or m.jct_s is None:
        return False
    if jct_s is not None and m.jct_s > jct_s + 1e-9:
        return False
    if ttft_s is not None and (m.ttft_s is None or m.ttft_s > ttft_s):
        return False
    return tpot_s is None or m.tpot_s is None or m.tpot_s <= tpot_s


def summarize(requests: list[Request], sim, core, end_s: float, budget: int) -> RunMetrics:
    per = [RequestMetrics.of(r) for r in requests]
    fin = [m for m in per if m.finished]
    start = min((r.arrival_s for r in requests), default=0.0)
    last = max((r.finished_s for r in requests if r.finished_s is not None), default=end_s)
    dur = max(last - start, 1e-9)
    jct = [m.jct_s for m in fin]
    ttft = [m.ttft_s for m in per if m.ttft_s is not None]
    tpot = [m.tpot_s for m in fin if m.tpot_s is not None]
    w = np.asarray(sim.iter_time) if sim.iter_time else np.ones(1)
    # Tokens written / capacity per step = reserved share x written share (same step); a
    # simulator that logs no written share (DistServe) gets 0.
    used: list[float] = []
    if len(sim.kv_written) == len(sim.kv_reserved):
        used = [r * x for r, x in zip(sim.kv_reserved, sim.kv_written, strict=True)]
    c = core.counters
    return RunMetrics(
        requests=len(per),
        finished=len(fin),
        duration_s=dur,
        throughput_rps=len(fin) / dur,
        output_tok_s=sum(m.output_tokens for m in fin) / dur,
        goodput_rps=sum(m.slo_met for m in per) / dur,
        slo_attainment=sum(m.slo_met for m in per) / max(1, len(per)),
        mean_jct_s=_mean(jct),
        p50_jct_s=_pct(jct, 50),
        p99_jct_s=_pct(jct, 99),
        mean_ttft_s=_mean(ttft),
        p99_ttft_s=_pct(ttft, 99),
        mean_tpot_s=_mean(tpot),
        p99_tpot_s=_pct(tpot, 99),
        mean_norm_latency_s=_mean([m.normalized_latency_s for m in fin if m.normalized_latency_s]),
        kv_reserved_share=float(np.average(sim.kv_reserved, weights=w)) if sim.kv_reserved else 0.0,
        kv_written_share=float(np.average(sim.kv_written, weights=w)) if sim.kv_written else 0.0,
        kv_reserved_share_max=float(max(sim.kv_reserved, default=0.0)),
        kv_used_share=_mean_or_zero(used, w),
        kv_used_share_max=float(max(used, default=0.0)),
        compute_util=_mean(sim.iter_tokens) / budget if sim.iter_tokens else 0.0,
        iterations=len(sim.iter_time),
        preemptions=c.preemptions,
        preempted_requests=sum(1 for m in per if m.preemptions),
        extensions=c.extensions,
        loans=c.loans,
        guest_moves=c.guest_moves,
        sched_us_per_iter_p50=_pct(sim.sched_us, 50),
        sched_us_per_iter_p99=_pct(sim.sched_us, 99),
        apply_us_per_iter_p99=_pct(sim.apply_us, 99),
    )
