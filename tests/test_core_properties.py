"""Property test of the whole scheduler core.

Random arrivals, mispredictions, small KV caches, 1-3 workers, random aborts and worker errors,
every policy (EcoServe with random ablations), driven to completion by a fake worker with a
shadow KV cache. Every request must end with a reason, every block must come back, and token
indices must be contiguous. (The KVLedger state machine is in test_core_ledger_machine.py.)
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# ---- (b) the whole core ----------------------------------------------------------------------
from test_core_driver import EOS, POLICY_NAMES, TOKEN  # noqa: E402

from ecoserve_scheduler.core import (
    SLO,
    FinishEvent,
    PreemptEvent,
    Request,
    SamplingParams,
    SchedulerCore,
    Status,
    StepResult,
    TokenEvent,
    WorkerSpec,
    make_policy,
)

BLOCK = 16


def make_result(plan, sampled: dict[str, int], error: str | None = None) -> StepResult:
    """What a worker returns: one token per `plan.sampled_ids()`, in that order."""
    tokens = () if error else tuple(sampled[rid] for rid in plan.sampled_ids())
    return StepResult(plan.step_id, plan.worker_id, tokens=tokens, error=error)


class CoreRun:
    """Drives a SchedulerCore with fake workers that execute a plan (on a shadow KV cache) only
    when its result is delivered, possibly several rounds later, with aborts, worker errors and
    worker removals in between."""

    def __init__(self, policy, specs, rng: random.Random, error_rate: float) -> None:
        self.core = SchedulerCore(policy)
        self.specs = {s.worker_id: s for s in specs}
        for s in specs:
            self.core.add_worker(s)
        self.rng = rng
        self.error_rate = error_rate
        self.kv = {s.worker_id: {} for s in specs}
        self.in_flight: dict[str, object] = {}
        self.targets: dict[str, int] = {}
        self.aborted: set[str] = set()
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.finished: dict[str, str] = {}
        self.now = 0.0

    # ---- events ----------------------------------------------------------------------------

    def record(self, events) -> None:
        for e in events:
            rid = e.request_id
            assert rid in self.core.requests, f"event for unknown request {rid}"
            if isinstance(e, TokenEvent):
                seen = self.tokens[rid]
                assert e.output_index == len(seen), (
                    f"{rid}: token index {e.output_index} after {len(seen)}"
                )
                assert rid not in self.finished, f"{rid}: token after its finish"
                seen.append(e.token_id)
            elif isinstance(e, FinishEvent):
                assert rid not in self.finished, f"{rid} finished twice"
                assert e.reason, f"{rid} finished without a reason"
                self.finished[rid] = e.reason
            else:
                assert isinstance(e, PreemptEvent) and e.reason
                assert rid not in self.finished

    # ---- the fake worker -------------------------------------------------------------------

    def execute(self, plan) -> dict[str, int]:
        kv = self.kv[plan.worker_id]
        for src, dst in plan.block_copies:
            kv[dst] = list(kv.get(src, [None] * BLOCK))
        sampled = {}
        for s in plan.seqs:
            r = self.core.requests[s.request_id]
            key_inc = r.preemptions
            table = s.block_table
            if r.status is Status.RUNNING:  # an aborted request's context may be reused: skip
                for i in range(-(-s.start_pos // BLOCK)):
                    k = min(BLOCK, s.start_pos - i * BLOCK)
                    key = (s.request_id, key_inc, i * BLOCK)
                    got = kv.get(table[i], [None] * BLOCK)[:k]
                    assert got == [key] * k, f"step {plan.step_id}: {key} reads {got}"
            for pos in range(s.start_pos, s.start_pos + s.num_tokens):
                slot = kv.setdefault(table[pos // BLOCK], [None] * BLOCK)
                slot[pos % BLOCK] = (s.request_id, key_inc, pos - pos % BLOCK)
            if s.sample:
                done = r.num_output + 1 >= self.targets[s.request_id]
                sampled[s.request_id] = EOS if done else TOKEN
        return sampled

    # ---- checks ----------------------------------------------------------------------------

    def check_plan(self, plan) -> None:
        spec = self.specs[plan.worker_id]
        ids = [s.request_id for s in plan.seqs]
        assert len(ids) == len(set(ids)), f"a request twice in one plan: {ids}"
        assert len(ids) <= spec.max_num_seqs
        if self.core.policy.chunked:
            assert plan.num_tokens <= spec.token_budget
        for s in plan.seqs:
            r = self.core.requests[s.request_id]
            assert r.status is Status.RUNNING and r.worker_id == plan.worker_id
            assert s.num_tokens >= 1 and s.start_pos + s.num_tokens <= r.num_tokens
            assert len(s.block_table) * BLOCK >= s.start_pos + s.num_tokens
            assert s.sample == (s.start_pos + s.num_tokens == r.num_tokens)

    def check_state(self) -> None:
        core = self.core
        for w in core.workers.values():
            w.ledger.check()
            for rid, r in w.running.items():
                assert r.status is Status.RUNNING and r.worker_id == w.spec.worker_id
                assert w.ledger.has(rid)
        waiting = 0
        for rid, r in core.requests.items():
            if r.status is Status.RUNNING:  # held by exactly one live worker
                assert r.worker_id in core.workers and rid in core.workers[r.worker_id].running
            elif r.status is Status.WAITING:
                waiting += 1
                assert r.worker_id is None
            else:
                assert r.finish_reason and self.finished.get(rid) == r.finish_reason
            assert r.num_output == len(self.tokens[rid])
        assert core.num_waiting == waiting

    # ---- the loop --------------------------------------------------------------------------

    def deliver(self, wid: str) -> None:
        plan = self.in_flight.pop(wid)
        error = "injected worker error" if self.rng.random() < self.error_rate else None
        # A failed step may have done nothing at all, block copies included.
        sampled = {} if error else self.execute(plan)
        self.record(self.core.update(make_result(plan, sampled, error), self.now))
        self.check_state()

    def round(self) -> None:
        wids = list(self.core.workers)
        self.rng.shuffle(wids)
        for wid in wids:
            if wid in self.in_flight and self.rng.random() < 0.8:
                self.deliver(wid)
            if wid not in self.in_flight:
                plan, events = self.core.schedule(wid, self.now)
                self.record(events)
                self.check_state()
                if plan is not None:
                    self.check_plan(plan)
                    self.in_flight[wid] = plan
        self.now += 0.01

    def remove_worker(self) -> None:
        wid = self.rng.choice(sorted(self.core.workers))
        plan = self.in_flight.pop(wid, None)
        self.record(self.core.remove_worker(wid, self.now))
        if plan is not None:  # the dead worker's late result is ignored
            assert self.core.update(make_result(plan, {}, "dead"), self.now) == []
        del self.kv[wid]
        self.check_state()


request_st = st.tuples(
    st.integers(0, 100).map(lambda ms: ms / 1000),  # arrival gap (s)
    st.integers(1, 300),  # prompt length
    st.integers(1, 200),  # true output length
    st.integers(2, 30).map(lambda x: x / 10),  # prediction = true * factor, factor in [0.2, 3]
    st.integers(10, 15).map(lambda x: x / 10),  # upper quantile = prediction * this
    st.integers(-30, 60),  # max_tokens - true length (negative: length-capped)
    st.one_of(st.none(), st.integers(5, 2000).map(lambda cs: cs / 100)),  # JCT deadline (s)
)
# 40-200 blocks of 16, mostly at the small end: KV pressure is where the bugs live.
worker_st = st.tuples(
    st.one_of(st.integers(40, 80), st.integers(40, 200)), st.integers(32, 256), st.integers(1, 64)
)
ecoserve_options = st.fixed_dictionaries(
    {
        "pipelining": st.booleans(),
        "ordering": st.booleans(),
        "reserve_share": st.sampled_from([0.0, 0.03, 0.1]),
        "pad_weight": st.sampled_from([0.0, 0.5, 1.0]),
        "lend_margin_tokens": st.sampled_from([0, 4, 16]),
        "collision_lookahead": st.sampled_from([0, 2]),
        "slo_guard": st.booleans(),
        "guard_min_prefill": st.sampled_from([0, 1, 8, 256]),
        "guard_every": st.sampled_from([1, 8]),
        "overcommit_share": st.sampled_from([0.0, 0.5, 2.0]),
    }
)


def run_core_property(policy_name, eco, requests, workers, seed, abort_share, errors, removal):
    rng = random.Random(seed)
    options = eco if policy_name == "ecoserve" else {}
    specs = [
        WorkerSpec(f"w{i}", num_blocks=nb, block_size=BLOCK, token_budget=tb, max_num_seqs=ms)
        for i, (nb, tb, ms) in enumerate(workers)
    ]
    run = CoreRun(make_policy(policy_name, **options), specs, rng, 0.02 if errors else 0.0)
    arrivals = []
    t = 0.0
    for i, (gap, prompt, true_len, factor, upper, dmax, deadline) in enumerate(requests):
        t += gap
        predicted = max(1, round(true_len * factor))
        r = Request(
            f"r{i}",
            prompt_len=prompt,
            arrival_s=t,
            sampling=SamplingParams(max_tokens=max(1, true_len + dmax)),
            # A request with a deadline also has a TTFT target: EcoServe may overcommit for it.
            slo=SLO(
                jct_deadline_s=math.inf if deadline is None else t + deadline,
                ttft_s=None if deadline is None else deadline / 4,
            ),
            eos_token_id=EOS,
            predicted_rl=predicted,
            predicted_rl_upper=max(predicted, round(predicted * upper)),
        )
        arrivals.append(r)
        run.targets[r.request_id] = true_len
    aborts = {
        r.request_id: r.arrival_s + rng.uniform(0.0, 1.0)
        for r in arrivals
        if rng.random() < abort_share
    }
    remove_at = rng.uniform(0.0, 2.0) if removal and len(specs) > 1 else None

    queue = list(arrivals)
    for _ in range(30_000):
        while queue and queue[0].arrival_s <= run.now:
            r = queue.pop(0)
            run.record(run.core.add(r, run.now))
            run.check_state()
        for rid, when in list(aborts.items()):
            if when <= run.now and rid in run.core.requests:
                del aborts[rid]
                run.aborted.add(rid)
                run.record(run.core.abort(rid, run.now))
                run.check_state()
        if remove_at is not None and run.now >= remove_at:
            remove_at = None
            run.remove_worker()
        if not queue and all(r.status.done for r in run.core.requests.values()):
            break
        run.round()
    else:
        live = {
            rid: (r.status, r.num_output, run.targets[rid])
            for rid, r in run.core.requests.items()
            if not r.status.done
        }
        raise AssertionError(f"requests never ended: {live}")

    # every request ended, with a reason, and with the right output
    assert set(run.core.requests) == {r.request_id for r in arrivals}
    for r in arrivals:
        rid = r.request_id
        assert r.status.done and r.finish_reason, (rid, r.status)
        assert run.finished[rid] == r.finish_reason
        assert run.tokens[rid] == r.output_token_ids
        if r.status is Status.FINISHED:
            if r.finish_reason == "stop":
                assert r.num_output == run.targets[rid], (rid, r.num_output, run.targets[rid])
                assert r.output_token_ids[-1] == EOS
            else:
                assert r.finish_reason == "length"
                assert r.num_output == r.sampling.max_tokens < run.targets[rid]
            assert EOS not in r.output_token_ids[:-1]
        elif r.status is Status.ABORTED:
            assert rid in run.aborted and r.finish_reason == "aborted"
        else:
            assert r.finish_reason.startswith("failed"), r.finish_reason
            assert errors, f"{rid} failed without injected errors: {r.finish_reason}"
    # every block is back
    for w in run.core.workers.values():
        w.ledger.check()
        u = w.ledger.usage()
        assert not w.running and (u.blocks_used, u.blocks_lent, u.tokens_written) == (0, 0, 0)
    assert run.core.num_waiting == 0


CORE_SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same examples every run
    database=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("policy_name", POLICY_NAMES)
def test_core_every_request_ends_and_every_block_returns(policy_name: str) -> None:
    @settings(CORE_SETTINGS, max_examples=50)
    @given(
        eco=ecoserve_options,
        requests=st.integers(2, 16).flatmap(lambda n: st.lists(request_st, min_size=n, max_size=n)),
        workers=st.lists(worker_st, min_size=1, max_size=3),
        seed=st.integers(0, 2**32 - 1),
        abort_share=st.sampled_from([0.0, 0.0, 0.2]),
        errors=st.booleans(),
        removal=st.booleans(),
    )
    def run(eco, requests, workers, seed, abort_share, errors, removal) -> None:
        run_core_property(policy_name, eco, requests, workers, seed, abort_share, errors, removal)

    run()


# KVCPipe needs a decoding host with a long, mostly empty reservation and a short guest that
# finds fresh blocks short: over-predicted long requests first, then short, mispredicted ones.
host_st = st.tuples(
    st.just(0.0),
    st.integers(1, 64),
    st.integers(40, 200),
    st.integers(15, 30).map(lambda x: x / 10),
    st.integers(10, 15).map(lambda x: x / 10),
    st.integers(0, 60),
    st.none(),
)
guest_st = st.tuples(
    st.integers(0, 50).map(lambda ms: ms / 1000),
    st.integers(1, 64),
    st.integers(1, 60),
    st.integers(2, 30).map(lambda x: x / 10),
    st.integers(10, 15).map(lambda x: x / 10),
    st.integers(0, 60),
    st.one_of(st.none(), st.integers(5, 500).map(lambda cs: cs / 100)),
)


def test_ecoserve_kvcpipe_loans_keep_every_invariant() -> None:
    @settings(CORE_SETTINGS, max_examples=100)
    @given(
        eco=ecoserve_options.map(lambda o: {**o, "pipelining": True}),
        hosts=st.lists(host_st, min_size=1, max_size=3),
        guests=st.lists(guest_st, min_size=2, max_size=10),
        workers=st.lists(
            st.tuples(st.integers(40, 80), st.integers(32, 128), st.integers(4, 64)),
            min_size=1,
            max_size=2,
        ),
        seed=st.integers(0, 2**32 - 1),
        abort_share=st.sampled_from([0.0, 0.2]),
        errors=st.booleans(),
    )
    def run(eco, hosts, guests, workers, seed, abort_share, errors) -> None:
        run_core_property(
            "ecoserve", eco, hosts + guests, workers, seed, abort_share, errors, False
        )

    run()
