"""Behaviour of SchedulerCore with every policy, driven by a fake worker.

The fake worker keeps a shadow KV cache: every slot (block, offset) records which request wrote
which position in which incarnation (preemption count). Before a sequence runs, every position of
its context must still be where its block table says, so a slot overwritten by another sequence,
a missing or wrong KVCPipe block copy, or a stale block table shows up as a failed assertion.
"""

from __future__ import annotations

import math
from collections import defaultdict

from ecoserve_scheduler.core import (
    SLO,
    BatchPlan,
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

EOS = 2
TOKEN = 1
POLICY_NAMES = ("ecoserve", "vllm", "sarathi", "orca", "sjf")


class Driver:
    """A tiny shell around SchedulerCore: fake workers, an event log and per-step checks."""

    def __init__(self, policy: str = "vllm", specs=None, placement=None, **options) -> None:
        self.policy_name = policy
        self.core = SchedulerCore(make_policy(policy, **options), placement)
        self.specs: dict[str, WorkerSpec] = {}
        self.kv: dict[str, dict[int, list]] = {}  # worker -> block -> slot contents
        for spec in specs or [WorkerSpec("w0", num_blocks=64, block_size=16, token_budget=256)]:
            self.add_worker(spec)
        self.now = 0.0
        self.targets: dict[str, int] = {}
        self.tokens: dict[str, list[int]] = defaultdict(list)  # request -> token event indices
        self.finishes: dict[str, str] = {}
        self.preempts: list[PreemptEvent] = []
        self.plans: list[BatchPlan] = []
        self.expected: dict[int, dict[str, int]] = {}  # step id -> sampled tokens

    def add_worker(self, spec: WorkerSpec) -> None:
        self.core.add_worker(spec)
        self.specs[spec.worker_id] = spec
        self.kv[spec.worker_id] = {}

    # ---- requests --------------------------------------------------------------------------

    def add(
        self,
        rid: str,
        prompt: int,
        target: int,
        *,
        predicted: int | None = None,
        upper: int | None = None,
        max_tokens: int | None = None,
        deadline: float = math.inf,
        ttft: float | None = None,
        tpot: float | None = None,
        ignore_eos: bool = False,
        stop: tuple[int, ...] = (),
        arrival: float | None = None,
    ) -> Request:
        predicted = target if predicted is None else predicted
        r = Request(
            rid,
            prompt_len=prompt,
            arrival_s=self.now if arrival is None else arrival,
            sampling=SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else max(target, 1) + 64,
                ignore_eos=ignore_eos,
                stop_token_ids=stop,
            ),
            slo=SLO(jct_deadline_s=deadline, ttft_s=ttft, tpot_s=tpot),
            eos_token_id=EOS,
            predicted_rl=predicted,
            predicted_rl_upper=predicted if upper is None else upper,
        )
        self.targets[rid] = target
        self.record(self.core.add(r, self.now))
        return r

    def abort(self, rid: str) -> None:
        self.record(self.core.abort(rid, self.now))

    def record(self, events) -> None:
        for e in events:
            if isinstance(e, TokenEvent):
                seen = self.tokens[e.request_id]
                assert e.output_index == len(seen), (
                    f"{e.request_id}: token index {e.output_index} after {seen}"
                )
                assert e.request_id not in self.finishes
                seen.append(e.output_index)
            elif isinstance(e, FinishEvent):
                assert e.request_id not in self.finishes, f"{e.request_id} finished twice"
                assert e.reason
                self.finishes[e.request_id] = e.reason
            else:
                assert isinstance(e, PreemptEvent) and e.reason
                self.preempts.append(e)

    # ---- one iteration ---------------------------------------------------------------------

    def schedule(self, wid: str = "w0") -> BatchPlan | None:
        plan, events = self.core.schedule(wid, self.now)
        self.record(events)
        self.check_ledgers()
        if plan is None:
            return None
        self.plans.append(plan)
        self.check_plan(plan)
        self.expected[plan.step_id] = self.execute(plan)
        return plan

    def result(self, plan: BatchPlan, error: str | None = None) -> StepResult:
        sampled = self.expected.pop(plan.step_id)
        return make_result(plan, {} if error else sampled, error)

    def apply(self, result: StepResult) -> list:
        events = self.core.update(result, self.now)
        self.record(events)
        self.check_ledgers()
        return events

    def step(self) -> int:
        """One round: every worker schedules and applies one plan. Returns the plans run."""
        n = 0
        for wid in list(self.core.workers):
            plan = self.schedule(wid)
            if plan is not None:
                n += 1
                self.now += 0.01
                self.apply(self.result(plan))
        self.now += 0.001
        return n

    def run(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if all(r.status.done for r in self.core.requests.values()):
                return
            self.step()
        live = [r.request_id for r in self.core.requests.values() if not r.status.done]
        raise AssertionError(f"requests still live after {max_steps} steps: {live}")

    # ---- the fake worker -------------------------------------------------------------------

    def execute(self, plan: BatchPlan) -> dict[str, int]:
        """Run the plan on the shadow cache; return the tokens the worker samples.

        A slot holds (request, incarnation, first position of its block); a block of a sequence's
        context must hold its own key in every slot the context covers."""
        bs = self.specs[plan.worker_id].block_size
        kv = self.kv[plan.worker_id]
        for src, dst in plan.block_copies:
            kv[dst] = list(kv.get(src, [None] * bs))
        sampled = {}
        for s in plan.seqs:
            r = self.core.requests[s.request_id]
            inc = r.preemptions
            table = s.block_table
            for i in range(-(-s.start_pos // bs)):  # the context it attends to is intact
                k = min(bs, s.start_pos - i * bs)
                key = (s.request_id, inc, i * bs)
                got = kv.get(table[i], [None] * bs)[:k]
                assert got == [key] * k, f"step {plan.step_id}: {key} reads {got}"
            for pos in range(s.start_pos, s.start_pos + s.num_tokens):
                base = pos - pos % bs
                kv.setdefault(table[pos // bs], [None] * bs)[pos % bs] = (s.request_id, inc, base)
            if s.sample:
                done = r.num_output + 1 >= self.targets[s.request_id]
                sampled[s.request_id] = EOS if done else TOKEN
        return sampled

    # ---- checks ----------------------------------------------------------------------------

    def check_ledgers(self) -> None:
        for w in self.core.workers.values():
            w.ledger.check()

    def check_plan(self, plan: BatchPlan) -> None:
        spec = self.specs[plan.worker_id]
        w = self.core.workers[plan.worker_id]
        seqs = plan.seqs
        ids = [s.request_id for s in seqs]
        assert len(ids) == len(set(ids)), f"a request twice in one plan: {ids}"
        assert len(seqs) <= spec.max_num_seqs
        decodes = set(plan.decodes.request_ids)
        sizes = [s.num_tokens for s in plan.prefills]
        if self.core.policy.chunked:
            assert plan.num_tokens <= spec.token_budget, f"{plan.num_tokens} > budget"
        else:  # unchunked (Orca): a prompt runs whole; admission stops once the budget is spent
            assert all(s.start_pos == 0 and s.sample for s in plan.prefills)
            assert not sizes or len(decodes) + sum(sizes[:-1]) < spec.token_budget
        for s in seqs:
            r = self.core.requests[s.request_id]
            assert r.status is Status.RUNNING and r.worker_id == plan.worker_id
            assert s.num_tokens >= 1
            assert s.start_pos + s.num_tokens <= r.num_tokens
            assert len(s.block_table) * spec.block_size >= s.start_pos + s.num_tokens
            assert s.sample == (s.start_pos + s.num_tokens == r.num_tokens)
            if s.request_id in decodes:  # one token after a sampled one
                assert r.num_output >= 1 and s.start_pos == r.num_tokens - 1
        assert plan.sampled_ids() == [s.request_id for s in seqs if s.sample]
        if plan.prefills:  # stall-free: no decode with room waits while a prompt chunk runs
            waiting_decodes = [
                rid
                for rid, r in w.decoding.items()
                if r.status is Status.RUNNING and rid not in decodes
            ]
            assert not waiting_decodes, f"decodes {waiting_decodes} stalled behind a prefill"

    def check_done(self) -> None:
        """Every request finished with its target output count; the KV cache is empty."""
        for rid, r in self.core.requests.items():
            assert r.status is Status.FINISHED, (rid, r.status, r.finish_reason)
            assert r.num_output == self.targets[rid], (rid, r.num_output, self.targets[rid])
            assert self.finishes[rid] == r.finish_reason == "stop"
            assert len(self.tokens[rid]) == r.num_output
        self.check_empty()

    def check_empty(self) -> None:
        for w in self.core.workers.values():
            assert not w.running
            assert w.in_flight is None
            u = w.ledger.usage()
            assert (u.blocks_used, u.blocks_lent, u.tokens_written) == (0, 0, 0)
            assert w.ledger.num_free_total == w.ledger.num_blocks
        assert self.core.num_waiting == 0


def make_result(plan: BatchPlan, sampled: dict[str, int], error: str | None = None) -> StepResult:
    """What a worker returns: one token per `plan.sampled_ids()`, in that order."""
    tokens = () if error else tuple(sampled[rid] for rid in plan.sampled_ids())
    return StepResult(plan.step_id, plan.worker_id, tokens=tokens, error=error)


def spec(num_blocks=64, block_size=16, token_budget=256, wid="w0", **kw) -> WorkerSpec:
    return WorkerSpec(
        wid, num_blocks=num_blocks, block_size=block_size, token_budget=token_budget, **kw
    )


def ledger_of(d: Driver, wid: str = "w0"):
    return d.core.workers[wid].ledger


def mixed_workload(d: Driver, n: int = 12) -> None:
    """Prompts 10..197 tokens, outputs 5..148, predictions off by -20..+10 tokens."""
    for i in range(n):
        target = 5 + 13 * i
        d.add(
            f"r{i}",
            prompt=10 + 17 * i,
            target=target,
            predicted=max(1, target - 20 if i % 2 else target + 10),
        )


def ecoserve_host_and_guest(reserve_share: float = 0.0):
    """A decoding host with a long reservation and too few fresh blocks for a new guest."""
    d = Driver(
        "ecoserve",
        [spec(num_blocks=16, block_size=16, token_budget=64)],
        reserve_share=reserve_share,
    )
    d.add("h", prompt=16, target=150, predicted=200)
    d.step()
    d.step()
    ledger = ledger_of(d)
    assert len(ledger.table("h")) == 14 and ledger.num_free == 2
    d.add("g", prompt=32, target=8, predicted=8)  # needs blocks_for(40) = 3 blocks
    return d, ledger
