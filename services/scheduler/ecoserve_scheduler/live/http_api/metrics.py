"""Prometheus series of one HTTP app, on its own registry (no global state).

SLO attainment per class (live/slo.py), from the Frontend's counts, so requests of both APIs
(gRPC and HTTP) count: `ecoserve_slo_requests_total{slo_class}` (requests with an SLO that
ended, except those their client aborted), `ecoserve_slo_met_total{slo_class}`,
`ecoserve_slo_missed_total{slo_class, target}` (target: ttft, tpot, deadline, failed; a request
may miss several), `ecoserve_slo_attainment{slo_class}` (met / requests, once there is one) and
`ecoserve_slo_target_seconds{slo_class, target}` (the configured targets). `slo_class` takes the
configured class names and "custom" (explicit targets, no class) only: its cardinality is the
configuration's. Attainment over a window: rate(met) / rate(requests).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..frontend import Frontend


class Metrics:
    """Prometheus series of one app (own registry: no global state)."""

    def __init__(self, frontend: Frontend | None = None) -> None:
        """`frontend`: whose SLO counts to export (none without one)."""
        r = self.registry = CollectorRegistry()
        if frontend is not None:
            r.register(SloCollector(frontend))
        self.requests = Counter(
            "ecoserve_requests", "Finished requests", ["finish_reason"], registry=r
        )
        self.ttft = Histogram("ecoserve_ttft_seconds", "Time to first token", registry=r)
        self.tpot = Histogram(
            "ecoserve_tpot_seconds",
            "Time per output token after the first",
            registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
        )
        self.jct = Histogram("ecoserve_jct_seconds", "Request completion time", registry=r)
        self.pending = Gauge("ecoserve_pending_requests", "Requests in the system", registry=r)
        # Queue depth: what an autoscaler of the workers reads (deploy/kubernetes, the HPA).
        self.waiting = Gauge("ecoserve_waiting_requests", "Requests queued in the core", registry=r)
        self.workers = Gauge(
            "ecoserve_workers", "Registered workers (draining: leaving)", ["state"], registry=r
        )
        self.kv_blocks = Gauge("ecoserve_kv_blocks", "KV blocks", ["worker", "state"], registry=r)
        self.kv_tokens = Gauge(
            "ecoserve_kv_tokens_written", "KV tokens written", ["worker"], registry=r
        )
        self.preemptions = Gauge("ecoserve_preemptions", "Preemptions so far", registry=r)
        self.pred_calls = Gauge("ecoserve_predictor_calls", "Predictor calls", registry=r)
        self.pred_errors = Gauge("ecoserve_predictor_errors", "Predictor failures", registry=r)
        self.store_writes = Gauge(
            "ecoserve_store_writes", "Request-store writes so far", ["result"], registry=r
        )
        self.store_errors = Gauge(
            "ecoserve_store_errors", "Store calls that failed (the requests went on)", registry=r
        )
        self.rejected = Gauge(
            "ecoserve_rejected_requests", "Requests refused as over capacity", registry=r
        )
        self.pred_latency = Gauge(
            "ecoserve_predictor_latency_seconds_mean", "Mean predictor call time", registry=r
        )

    def observe(self, t0: float, first_s: float | None, n: int, reason: str) -> None:
        """A finished request: `t0` and `first_s` (its first token) on time.monotonic()."""
        end = time.monotonic()
        self.requests.labels(reason.split(":")[0]).inc()
        self.jct.observe(end - t0)
        if first_s is not None:
            self.ttft.observe(first_s - t0)
            if n > 1:
                self.tpot.observe((end - first_s) / (n - 1))

    def refresh(self, frontend: Frontend) -> bytes:
        snap = frontend.engine.stats_snapshot
        self.pending.set(frontend.engine.pending)
        self.waiting.set(snap.get("waiting", 0))
        self.preemptions.set(snap.get("preemptions", 0))
        workers, draining = snap.get("workers", []), snap.get("draining", {})
        self.workers.labels("serving").set(len([w for w in workers if w not in draining]))
        self.workers.labels("draining").set(len(draining))
        for wid, kv in snap.get("kv", {}).items():
            self.kv_blocks.labels(wid, "used").set(kv["blocks_used"])
            self.kv_blocks.labels(wid, "total").set(kv["num_blocks"])
            self.kv_tokens.labels(wid).set(kv["tokens_written"])
        if hasattr(frontend.store, "stats"):  # a StoreWriter
            for result, n in frontend.store.stats().items():
                if result in ("written", "failed", "queued", "retries"):
                    self.store_writes.labels(result).set(n)
        self.store_errors.set(frontend.store_errors)
        self.rejected.set(frontend.rejected)
        p = frontend.predictor
        self.pred_calls.set(p.calls)
        self.pred_errors.set(p.failures)
        self.pred_latency.set(p.latency_s_total / p.calls if p.calls else 0.0)
        return generate_latest(self.registry)


class SloCollector:
    """The per-class SLO series, read from the Frontend's SloLedger at each scrape."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    def collect(self):
        classes = self.frontend.slo_classes
        counts = self.frontend.slo_ledger.snapshot()
        requests = CounterMetricFamily(
            "ecoserve_slo_requests",
            "Requests with a latency SLO that ended (not aborted by their client)",
            labels=["slo_class"],
        )
        met = CounterMetricFamily(
            "ecoserve_slo_met", "Requests that met their latency SLO", labels=["slo_class"]
        )
        missed = CounterMetricFamily(
            "ecoserve_slo_missed",
            "Requests that missed a target of their SLO (ttft, tpot, deadline, failed)",
            labels=["slo_class", "target"],
        )
        attainment = GaugeMetricFamily(
            "ecoserve_slo_attainment",
            "Share of the requests with this SLO class that met it, since start",
            labels=["slo_class"],
        )
        for name, row in counts.items():
            requests.add_metric([name], row["requests"])
            met.add_metric([name], row["met"])
            for key, n in row.items():
                if key.startswith("missed_"):
                    missed.add_metric([name, key.removeprefix("missed_")], n)
            if row["requests"]:
                attainment.add_metric([name], row["met"] / row["requests"])
        targets = GaugeMetricFamily(
            "ecoserve_slo_target_seconds",
            "Each configured SLO class's targets",
            labels=["slo_class", "target"],
        )
        for name, t in classes.as_dict().items():
            for key, seconds in t.items():
                targets.add_metric([name, key.removesuffix("_s")], seconds)
        yield from (requests, met, missed, attainment, targets)
