"""Behaviour of SchedulerCore with every policy, driven by a fake worker.

The fake worker keeps a shadow KV cache: every slot (block, offset) records which request wrote
which position in which incarnation (preemption count). Before a sequence runs, every position of
its context must still be where its block table says, so a slot overwritten by another sequence,
a missing or wrong KVCPipe block copy, or a stale block table shows up as a failed assertion.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest

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
    bucket_of,
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
            slo=SLO(jct_deadline_s=deadline),
            eos_token_id=EOS,
            predicted_rl=predicted,
            predicted_rl_upper=predicted if upper is None else upper,
            rl_bucket=bucket_of(predicted),
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
                assert e.output_index == len(seen), f"{e.request_id}: token index {e.output_index} after {seen}"
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


# ---- every policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_finishes_every_request(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=200, block_size=16, token_budget=128)])
    mixed_workload(d)
    d.run()
    d.check_done()
    assert d.core.counters.finished == 12


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_finishes_under_kv_pressure(policy: str) -> None:
    """40 blocks of 16 tokens hold about three of these requests at once."""
    d = Driver(policy, [spec(num_blocks=40, block_size=16, token_budget=64)])
    mixed_workload(d)
    d.run()
    d.check_done()
    if policy == "orca":
        assert d.core.counters.preemptions == 0
    if policy in ("vllm", "sjf"):
        assert d.core.counters.preemptions > 0  # on-demand paging runs out mid-generation


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_on_two_workers(policy: str) -> None:
    d = Driver(
        policy,
        [
            spec(num_blocks=40, token_budget=64, wid="w0"),
            spec(num_blocks=60, token_budget=96, wid="w1"),
        ],
    )
    mixed_workload(d)
    d.run()
    d.check_done()
    assert {p.worker_id for p in d.plans} == {"w0", "w1"}


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_length_cap_and_ignore_eos(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=64, max_model_len=60)])
    d.add("capped", prompt=10, target=30, max_tokens=7)
    d.add("ignore", prompt=10, target=3, max_tokens=9, ignore_eos=True)
    d.add("ctx", prompt=50, target=30, max_tokens=40)  # reaches max_model_len first
    d.add("stop", prompt=10, target=30, stop=(TOKEN,))  # its first token is a stop token
    d.run()
    r = d.core.requests
    assert (r["capped"].finish_reason, r["capped"].num_output) == ("length", 7)
    assert (r["ignore"].finish_reason, r["ignore"].num_output) == ("length", 9)
    assert EOS in r["ignore"].output_token_ids  # it sampled EOS and kept going
    assert (r["ctx"].finish_reason, r["ctx"].num_output) == ("length", 10)
    assert (r["stop"].finish_reason, r["stop"].output_token_ids) == ("stop", [TOKEN])
    assert all(d.finishes[k] == r[k].finish_reason for k in r)
    d.check_empty()


# ---- vLLM ------------------------------------------------------------------------------------


def test_vllm_preempts_the_most_recent_request_and_it_still_finishes() -> None:
    # 8 blocks of 4 tokens; each request grows to 8 + 12 = 20 tokens = 5 blocks.
    d = Driver("vllm", [spec(num_blocks=8, block_size=4, token_budget=64)])
    d.add("a", prompt=8, target=12)
    d.add("b", prompt=8, target=12)
    d.run()
    assert [(e.request_id, e.reason) for e in d.preempts] == [("b", "KV cache needed by a")]
    assert d.core.requests["b"].preemptions == 1 and d.core.requests["a"].preemptions == 0
    assert d.core.counters.preemptions == 1
    # b was recomputed from position 0 with its outputs kept, not re-sampled
    b_plans = [s for p in d.plans for s in p.seqs if s.request_id == "b"]
    restart = [s for s in b_plans if s.start_pos == 0]
    assert len(restart) == 2 and restart[1].num_tokens > 8
    d.check_done()


def test_vllm_preempts_the_newest_request_even_when_it_is_the_one_growing() -> None:
    # 5 blocks of 4: a (8 tokens) fills 2 blocks, b (6 tokens) leaves room in its 2nd block;
    # a takes the last free block first, then b needs one: b is the newest, so b goes.
    d = Driver("vllm", [spec(num_blocks=5, block_size=4, token_budget=64)])
    d.add("a", prompt=8, target=12)
    d.add("b", prompt=6, target=12)
    d.run()
    d.check_done()
    assert [(e.request_id, e.reason) for e in d.preempts] == [("b", "out of KV cache")]
    assert d.core.requests["a"].preemptions == 0


# ---- Orca ------------------------------------------------------------------------------------


def test_orca_reserves_prompt_plus_max_tokens_and_never_preempts() -> None:
    d = Driver("orca", [spec(num_blocks=30, block_size=16, token_budget=64)])
    for i in range(6):
        d.add(f"r{i}", prompt=20 + 10 * i, target=10 + 5 * i, max_tokens=100 + 20 * i)
    plan = d.schedule()
    ledger = ledger_of(d)
    for s in plan.seqs:
        r = d.core.requests[s.request_id]
        assert len(ledger.table(s.request_id)) == ledger.blocks_for(
            r.prompt_len + 100 + 20 * int(s.request_id[1:])
        )
        assert s.start_pos == 0 and s.num_tokens == r.prompt_len and s.sample  # unchunked
    # r0 (8 blocks) + r1 (9) + r2 (10) = 27 of 30 blocks; r3 (11) must wait
    assert [s.request_id for s in plan.seqs] == ["r0", "r1", "r2"]
    d.apply(d.result(plan))
    sizes = {}
    while not all(r.status.done for r in d.core.requests.values()):
        d.step()
        for rid in d.core.workers["w0"].running:
            n = len(ledger.table(rid))
            assert sizes.setdefault(rid, n) == n  # never grows: it was reserved up front
    assert d.core.counters.preemptions == 0 and d.core.counters.extensions == 0
    d.check_done()


def test_orca_runs_a_prompt_larger_than_the_budget_whole() -> None:
    d = Driver("orca", [spec(num_blocks=64, block_size=16, token_budget=32)])
    d.add("long", prompt=100, target=3)
    plan = d.schedule()
    assert [(s.start_pos, s.num_tokens, s.sample) for s in plan.seqs] == [(0, 100, True)]
    d.apply(d.result(plan))
    d.run()
    d.check_done()


# ---- chunked prefill and batch composition ---------------------------------------------------


@pytest.mark.parametrize("policy", ["vllm", "sarathi", "ecoserve", "sjf"])
def test_chunked_prefill_respects_the_token_budget(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=64, block_size=16, token_budget=32)])
    d.add("long", prompt=100, target=3)
    chunks = []
    for _ in range(4):
        plan = d.schedule()
        chunks.append([(s.start_pos, s.num_tokens, s.sample) for s in plan.seqs])
        d.apply(d.result(plan))
    assert chunks == [[(0, 32, False)], [(32, 32, False)], [(64, 32, False)], [(96, 4, True)]]
    d.add("other", prompt=70, target=2)
    d.run()  # check_plan asserts the budget on every plan
    assert all(p.num_tokens <= 32 for p in d.plans)
    assert max(p.num_tokens for p in d.plans) == 32
    d.check_done()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_decodes_run_before_prefill_chunks_and_never_stall(policy: str) -> None:
    """Stall-free batching (Sarathi; EcoServe's SyncDecoupled): every decode takes its token
    before any prompt chunk fills the rest of the budget. check_plan asserts on every plan that
    no decoding request with room waits while a chunk runs."""
    d = Driver(policy, [spec(num_blocks=100, block_size=16, token_budget=24)])
    d.add("short0", prompt=4, target=30)
    d.add("short1", prompt=4, target=30)
    d.step()
    d.add("p0", prompt=60, target=30)  # longer than the budget left by the two decodes
    d.add("p1", prompt=40, target=30)
    mixed = 0
    while not all(r.status.done for r in d.core.requests.values()):
        plan = d.schedule()
        if plan.decodes.request_ids and plan.prefills:
            mixed += 1
            n = len(plan.decodes)
            assert all(s.num_tokens == 1 and s.sample for s in plan.seqs[:n])
            assert plan.sampled_ids()[:n] == list(plan.decodes.request_ids)
        d.apply(d.result(plan))
    assert mixed > 0  # some plans mixed decodes and prefill chunks
    d.check_done()


def test_max_num_seqs_caps_admissions() -> None:
    d = Driver("vllm", [spec(num_blocks=100, block_size=16, token_budget=512, max_num_seqs=3)])
    for i in range(7):
        d.add(f"r{i}", prompt=8, target=4)
    d.run()
    assert max(len(p.seqs) for p in d.plans) == 3
    d.check_done()


# ---- SJF -------------------------------------------------------------------------------------


def test_sjf_admits_the_shortest_prediction_first() -> None:
    d = Driver("sjf", [spec(num_blocks=100, block_size=16, token_budget=512)])
    for rid, predicted in [("long", 90), ("short", 5), ("mid", 40), ("tie", 40)]:
        d.add(rid, prompt=10, target=predicted)
        d.now += 0.001
    plan = d.schedule()
    assert [s.request_id for s in plan.seqs] == ["short", "mid", "tie", "long"]
    d.apply(d.result(plan))
    d.run()
    d.check_done()


def test_sjf_admits_shortest_first_when_only_one_fits() -> None:
    d = Driver("sjf", [spec(num_blocks=100, block_size=16, token_budget=512, max_num_seqs=1)])
    for rid, predicted in [("c", 30), ("a", 10), ("b", 20)]:
        d.add(rid, prompt=10, target=predicted)
    d.run()
    order = []
    for p in d.plans:
        for s in p.seqs:
            if s.start_pos == 0:
                order.append(s.request_id)
    assert order == ["a", "b", "c"]
    d.check_done()


# ---- EcoServe --------------------------------------------------------------------------------


def test_ecoserve_reserves_prompt_plus_padded_prediction() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, block_size=16, token_budget=512)], pad_weight=1.0)
    d.add("a", prompt=30, target=5, predicted=40, upper=70)
    d.add("b", prompt=100, target=5, predicted=10, upper=10, max_tokens=200)
    d.add("c", prompt=20, target=5, predicted=500, upper=600, max_tokens=50)  # capped at max_tokens
    d.schedule()
    ledger = ledger_of(d)
    assert len(ledger.table("a")) == ledger.blocks_for(30 + 70)
    assert len(ledger.table("b")) == ledger.blocks_for(100 + 10)
    assert len(ledger.table("c")) == ledger.blocks_for(20 + 50)


def test_ecoserve_default_pad_is_halfway_to_the_upper_quantile() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, block_size=16)])
    d.add("a", prompt=30, target=5, predicted=40, upper=120)
    d.schedule()
    assert len(ledger_of(d).table("a")) == ledger_of(d).blocks_for(30 + 80)


def test_ecoserve_pad_weight_zero_reserves_the_point_prediction() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, block_size=16)], pad_weight=0.0)
    d.add("a", prompt=30, target=5, predicted=40, upper=70)
    d.schedule()
    assert len(ledger_of(d).table("a")) == ledger_of(d).blocks_for(30 + 40)


def test_ecoserve_extends_on_under_prediction_without_preempting() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, block_size=16)])
    r = d.add("a", prompt=20, target=150, predicted=4, upper=6, max_tokens=400)
    d.add("b", prompt=20, target=40, predicted=40)
    plan = d.schedule()
    assert len(ledger_of(d).table("a")) == ledger_of(d).blocks_for(26)
    d.apply(d.result(plan))
    d.run()
    assert d.core.counters.extensions > 0 and r.extensions > 0
    assert d.core.counters.preemptions == 0
    assert r.predicted_rl_upper > 100  # re-bucketed to what it has reserved
    d.check_done()


def test_ecoserve_extension_uses_the_reserve_pool_before_preempting() -> None:
    # 20 blocks of 16, reserve int(20 * 0.2) = 4 blocks. a reserves 16 + 16 = 2 blocks, b takes
    # the rest of the fresh blocks; a's overrun can only come from the reserve pool.
    d = Driver("ecoserve", [spec(num_blocks=20, block_size=16)], reserve_share=0.2)
    a = d.add("a", prompt=16, target=60, predicted=16, max_tokens=80)
    d.add("b", prompt=16, target=200, predicted=200, upper=208)
    plan = d.schedule()
    ledger = ledger_of(d)
    assert ledger.num_free == 0 and ledger.num_free_total == 4
    d.apply(d.result(plan))
    d.run()
    assert a.extensions > 0 and d.core.counters.preemptions == 0
    d.check_done()


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


def test_ecoserve_lends_a_hosts_tail_when_fresh_blocks_are_short() -> None:
    d, ledger = ecoserve_host_and_guest()
    host_table = list(ledger.table("h"))
    d.step()
    assert d.core.counters.loans == 1
    assert ledger.is_guest("g") and ledger.host_of("g") == "h"
    assert ledger.table("g") == host_table[11:14]  # the host's tail run
    assert ledger.writable("h") == 11 * 16
    assert ledger.num_free == 2  # the loan took no fresh blocks
    assert d.core.stats()["kv"]["w0"]["blocks_lent"] == 3
    d.run()
    assert d.core.counters.preemptions == 0
    d.check_done()


def test_ecoserve_without_pipelining_makes_the_guest_wait() -> None:
    d = Driver("ecoserve", [spec(num_blocks=16, block_size=16, token_budget=64)], pipelining=False)
    d.add("h", prompt=16, target=150, predicted=200)
    d.step()
    d.add("g", prompt=32, target=8, predicted=8)
    d.step()
    assert d.core.requests["g"].status is Status.WAITING
    d.run()
    assert d.core.counters.loans == 0
    assert d.core.requests["g"].admitted_s > d.core.requests["h"].finished_s - 1e-9
    d.check_done()


def ecoserve_collision(reserve_share: float, num_blocks: int) -> Driver:
    """A guest's prefill is slower than predicted (decodes eat the budget), so the host reaches
    the lent blocks while the guest still lives there.

    Block size 4, budget 8. h reserves 4 + 56 = 15 blocks, d0..d2 9 blocks each; 5 fresh blocks
    stay free. g (prompt 40, predicted 1) needs 11 blocks, so it borrows h[4:15]: h may write 16
    tokens. g's prefill is predicted to take 40 / 8 = 5 iterations but gets 8 - 4 decodes = 4
    tokens per iteration, so h reaches token 16 before g is done."""
    d = Driver(
        "ecoserve",
        [spec(num_blocks=num_blocks, block_size=4, token_budget=8)],
        reserve_share=reserve_share,
        lend_margin_tokens=0,
    )
    d.add("h", prompt=4, target=100, predicted=56)
    for i in range(3):
        d.add(f"d{i}", prompt=4, target=30, predicted=30)
    for _ in range(3):
        d.step()
    ledger = ledger_of(d)
    assert [len(ledger.table(k)) for k in ("h", "d0", "d1", "d2")] == [15, 9, 9, 9]
    assert ledger.num_free == 5
    d.add("g", prompt=40, target=2, predicted=1)
    d.step()
    assert ledger.loan("g").host_id == "h" and ledger.loan("g").start == 4
    return d


def test_ecoserve_moves_the_guest_before_the_host_reaches_it() -> None:
    d = ecoserve_collision(reserve_share=0.205, num_blocks=59)  # 12 reserve blocks to move to
    ledger = ledger_of(d)
    old = list(ledger.table("g"))
    while ledger.is_guest("g"):
        assert ledger.written("h") <= ledger.loan("g").start * 4  # checked by ledger.check too
        assert not d.core.requests["g"].status.done
        d.step()
    assert d.core.counters.guest_moves == 1 and d.core.counters.guest_preemptions == 0
    moving_plan = d.plans[-1]
    (g_seq,) = [s for s in moving_plan.seqs if s.request_id == "g"]
    new = list(g_seq.block_table)
    # the 10 blocks holding g's 40 tokens are copied to its new blocks, outside h's table
    assert list(moving_plan.block_copies) == list(zip(old[:10], new[:10], strict=True))
    assert not set(new) & set(ledger.table("h"))
    d.run()  # the shadow cache checks that g's tokens were copied where its new table points
    assert d.core.counters.preemptions == 0
    d.check_done()


def test_ecoserve_preempts_the_guest_when_it_cannot_move() -> None:
    d = ecoserve_collision(reserve_share=0.0, num_blocks=47)  # no reserve: nowhere to move
    d.run()
    assert d.core.counters.guest_preemptions == 1 and d.core.counters.guest_moves == 0
    assert [(e.request_id, e.reason.startswith("KVCPipe collision")) for e in d.preempts] == [
        ("g", True)
    ]
    d.check_done()


def test_ecoserve_puts_an_urgent_request_ahead_of_a_relaxed_one() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, block_size=16, token_budget=512)])
    d.add("relaxed", prompt=10, target=5, predicted=5)
    d.now += 0.01
    d.add("urgent", prompt=10, target=80, predicted=80, deadline=30.0)
    plan = d.schedule()
    assert [s.request_id for s in plan.seqs] == ["urgent", "relaxed"]
    d.apply(d.result(plan))
    d.run()
    d.check_done()


def test_ecoserve_without_ordering_is_fcfs() -> None:
    d = Driver(
        "ecoserve", [spec(num_blocks=200, token_budget=512)], ordering=False, synced_groups=False
    )
    d.add("relaxed", prompt=10, target=5, predicted=5)
    d.now += 0.01
    d.add("urgent", prompt=10, target=80, predicted=80, deadline=30.0)
    plan = d.schedule()
    assert [s.request_id for s in plan.seqs] == ["relaxed", "urgent"]


def test_ecoserve_serves_late_requests_after_on_time_ones() -> None:
    d = Driver("ecoserve", [spec(num_blocks=200, token_budget=512)], synced_groups=False)
    d.now = 10.0
    d.add("late", prompt=10, target=5, predicted=5, deadline=5.0)  # already past its deadline
    d.add("ontime", prompt=10, target=50, predicted=50, deadline=100.0)
    plan = d.schedule()
    assert [s.request_id for s in plan.seqs] == ["ontime", "late"]
    d.apply(d.result(plan))
    d.run()
    d.check_done()


@pytest.mark.parametrize("ordering", [True, False])
def test_time_synced_groups_admit_same_bucket_requests_together(ordering: bool) -> None:
    # Without groups: A (most urgent / first), B, C. With groups A opens bucket(20), so C (same
    # bucket) is admitted before B (another bucket).
    def order(synced: bool) -> list[str]:
        d = Driver(
            "ecoserve",
            [spec(num_blocks=200, token_budget=512)],
            synced_groups=synced,
            ordering=ordering,
        )
        d.add("A", prompt=10, target=20, deadline=100.0)
        d.now += 0.01
        d.add("B", prompt=10, target=40, deadline=200.0)
        d.now += 0.01
        d.add("C", prompt=10, target=20)
        plan = d.schedule()
        d.apply(d.result(plan))
        d.run()
        d.check_done()
        return [s.request_id for s in plan.seqs]

    assert bucket_of(20) != bucket_of(40)
    assert order(synced=True) == ["A", "C", "B"]
    assert order(synced=False) == ["A", "B", "C"]


@pytest.mark.parametrize(
    ("group_size", "expected"),
    [
        (1, "A1 B1 A2 A3"),
        (2, "A1 A2 B1 A3"),
        (16, "A1 A2 A3 B1"),
    ],
)
def test_time_synced_group_is_capped_at_group_size(group_size: int, expected: str) -> None:
    d = Driver(
        "ecoserve", [spec(num_blocks=400, token_budget=512)], ordering=False, group_size=group_size
    )
    for rid, predicted in [("A1", 20), ("B1", 40), ("A2", 20), ("A3", 20)]:
        d.add(rid, prompt=4, target=predicted)
        d.now += 0.001
    plan = d.schedule()
    assert " ".join(s.request_id for s in plan.seqs) == expected
    d.apply(d.result(plan))
    d.run()
    d.check_done()


# ---- abort, failures, workers ----------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_abort_frees_blocks_at_once_and_ignores_the_in_flight_result(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=64)])
    d.add("a", prompt=40, target=20)
    d.add("b", prompt=40, target=20)
    d.add("waiting", prompt=40, target=20)
    d.core.policy  # noqa: B018
    plan = d.schedule()
    d.apply(d.result(plan))
    plan = d.schedule()
    assert "a" in {s.request_id for s in plan.seqs}
    used = ledger_of(d).usage().blocks_used
    held = len(ledger_of(d).table("a"))
    d.abort("a")
    assert d.finishes["a"] == "aborted" and d.core.requests["a"].status is Status.ABORTED
    assert not ledger_of(d).has("a") and ledger_of(d).usage().blocks_used == used - held
    n_tokens = len(d.tokens["a"])
    events = d.apply(d.result(plan))
    assert not any(e.request_id == "a" for e in events)
    assert len(d.tokens["a"]) == n_tokens and d.core.requests["a"].num_output == n_tokens
    assert d.core.abort("a", d.now) == []  # already done
    d.targets["a"] = n_tokens
    d.run()
    assert d.core.requests["b"].status is Status.FINISHED
    d.check_empty()


def test_abort_of_a_waiting_request() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("w", prompt=10, target=3)
    d.abort("w")
    assert d.core.num_waiting == 0 and d.finishes["w"] == "aborted"
    assert d.schedule() is None
    assert d.core.abort("nope", d.now) == []


def test_abort_of_a_host_hands_the_loan_to_its_guest() -> None:
    d, ledger = ecoserve_host_and_guest()
    d.step()
    assert ledger.is_guest("g")
    g_table = list(ledger.table("g"))
    d.abort("h")
    assert not ledger.is_guest("g") and ledger.table("g") == g_table
    assert ledger.num_free == 16 - 3
    d.targets["h"] = d.core.requests["h"].num_output
    d.run()
    assert d.core.requests["g"].status is Status.FINISHED
    assert d.core.requests["g"].num_output == 8
    d.check_empty()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_prompt_longer_than_max_model_len_fails_at_add(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=64, max_model_len=100)])
    d.add("long", prompt=100, target=3)
    r = d.core.requests["long"]
    assert r.status is Status.FAILED and r.finish_reason.startswith("failed")
    assert "context" in r.finish_reason and d.finishes["long"] == r.finish_reason
    assert d.core.num_waiting == 0 and d.schedule() is None


def test_prompt_larger_than_any_kv_cache_fails_at_add() -> None:
    d = Driver("vllm", [spec(num_blocks=4, block_size=16)])
    d.add("big", prompt=64, target=3)  # 65 tokens need 5 blocks
    assert d.finishes["big"].startswith("failed")
    assert d.core.requests["big"].status is Status.FAILED


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_remove_worker_requeues_its_requests_which_finish_elsewhere(policy: str) -> None:
    # first-idle: both requests start on w0, the worker this test removes.
    specs = [spec(num_blocks=64, wid="w0"), spec(num_blocks=64, wid="w1")]
    d = Driver(policy, specs, placement="first-idle")
    d.add("a", prompt=20, target=10)
    d.add("b", prompt=20, target=10)
    plan = d.schedule("w0")
    d.apply(d.result(plan))
    plan = d.schedule("w0")  # in flight when the worker dies
    on_w0 = {s.request_id for s in plan.seqs}
    assert on_w0 == {"a", "b"}
    events = d.core.remove_worker("w0", d.now)
    d.record(events)
    assert {e.request_id for e in events} == on_w0
    assert all(isinstance(e, PreemptEvent) for e in events)
    for rid in on_w0:
        r = d.core.requests[rid]
        assert r.status is Status.WAITING and r.worker_id is None and r.num_computed == 0
    assert d.core.num_waiting == 2
    assert d.core.update(d.result(plan), d.now) == []  # the dead worker's late result
    d.run()
    for rid in on_w0:
        assert d.core.requests[rid].status is Status.FINISHED
    assert {p.worker_id for p in d.plans[2:]} == {"w1"}
    d.check_done()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_step_error_preempts_and_the_third_failure_fails_the_request(policy: str) -> None:
    d = Driver(policy, [spec(num_blocks=64)])
    d.add("a", prompt=20, target=5)
    for attempt in range(1, 4):
        plan = d.schedule()
        assert [s.request_id for s in plan.seqs] == ["a"]
        events = d.apply(d.result(plan, error="CUDA OOM"))
        r = d.core.requests["a"]
        if attempt < 3:
            assert [type(e) for e in events] == [PreemptEvent]
            assert r.status is Status.WAITING and r.preemptions == attempt
            assert "CUDA OOM" in events[0].reason
        else:
            assert [type(e) for e in events] == [FinishEvent]
            assert events[0].reason.startswith("failed") and "CUDA OOM" in events[0].reason
            assert r.status is Status.FAILED and r.finish_reason == events[0].reason
    assert d.core.counters.step_errors == 3 and d.core.counters.failed == 1
    d.check_empty()
    assert d.schedule() is None


def test_step_error_midway_then_recovery_keeps_outputs() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=8)
    for _ in range(4):
        d.step()
    assert d.core.requests["a"].num_output == 4
    plan = d.schedule()
    d.apply(d.result(plan, error="worker hiccup"))
    assert d.core.requests["a"].num_output == 4 and d.core.requests["a"].status is Status.WAITING
    d.run()
    assert d.tokens["a"] == list(range(8))  # indices continue, none duplicated
    d.check_done()


def test_a_result_with_the_wrong_token_count_fails_the_step() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=3)
    plan = d.schedule()
    d.expected.pop(plan.step_id)
    events = d.apply(StepResult(plan.step_id, "w0", tokens=()))
    assert [type(e) for e in events] == [PreemptEvent]
    assert "token count" in events[0].reason
    d.run()
    d.check_done()


def test_a_result_for_an_unknown_step_is_ignored() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=3)
    plan = d.schedule()
    assert d.core.update(StepResult(plan.step_id + 100, "w0", tokens=(EOS,)), d.now) == []
    assert d.core.update(StepResult(plan.step_id, "nope", tokens=(EOS,)), d.now) == []
    assert d.core.workers["w0"].in_flight is plan
    assert d.core.requests["a"].num_output == 0
    d.apply(d.result(plan))
    assert d.core.update(StepResult(plan.step_id, "w0", tokens=(EOS,)), d.now) == []  # twice
    d.run()
    d.check_done()


def test_schedule_while_a_plan_is_in_flight_raises() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=3)
    plan = d.schedule()
    with pytest.raises(RuntimeError):
        d.core.schedule("w0", d.now)
    d.apply(d.result(plan))
    d.run()
    d.check_done()


def test_duplicate_request_id_and_worker_id_are_rejected() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=3)
    with pytest.raises(ValueError):
        d.add("a", prompt=20, target=3)
    with pytest.raises(ValueError):
        d.core.add_worker(spec(num_blocks=8))


def test_unknown_policy_name() -> None:
    with pytest.raises(ValueError):
        make_policy("nope")


def test_stats_report_counters_and_kv() -> None:
    d = Driver("ecoserve", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=3)
    d.step()
    s = d.core.stats()
    assert s["policy"] == "ecoserve" and s["running"] == {"w0": 1} and s["waiting"] == 0
    assert s["kv"]["w0"]["tokens_written"] == 20 and s["kv"]["w0"]["blocks_used"] >= 2
    assert s["admitted"] == 1 and s["steps"] == 1
    d.run()
    s = d.core.stats()
    assert s["finished"] == 1 and s["kv"]["w0"]["blocks_used"] == 0


def test_release_forgets_only_done_requests() -> None:
    d = Driver("vllm", [spec(num_blocks=64)])
    d.add("a", prompt=20, target=1)
    d.add("b", prompt=20, target=5)
    d.step()
    d.core.release("a")
    d.core.release("b")
    assert "a" not in d.core.requests and "b" in d.core.requests


# ---- regressions (each of these once failed) ------------------------------------------------


@pytest.mark.parametrize("policy", ["vllm", "sjf", "ecoserve"])
def test_a_preempted_decode_is_not_readmitted_into_the_same_step(policy: str) -> None:
    # 3 blocks of 4 tokens, budget 4. At step 4 b needs a third block and a (already scheduled
    # as a decode) is preempted. It used to be re-admitted as a prefill chunk in the same step:
    # scheduled twice (a decode at position 0 plus a chunk [0, 2)), with a bogus token appended.
    core = SchedulerCore(make_policy(policy))
    core.add_worker(WorkerSpec("w0", num_blocks=3, block_size=4, token_budget=4))
    for rid in "ab":
        core.add(Request(rid, prompt_len=1, arrival_s=0.0, eos_token_id=EOS, predicted_rl=1), 0.0)
    for step in range(8):
        plan = core.schedule("w0", float(step)).plan
        if plan is None:
            break
        ids = [s.request_id for s in plan.seqs]
        assert len(ids) == len(set(ids)), f"step {step}: {ids}"
        for s in plan.seqs:
            r = core.requests[s.request_id]
            if s.request_id in plan.decodes.request_ids:  # right after what is in the cache
                assert s.start_pos == r.num_tokens - 1 > 0
        core.update(make_result(plan, dict.fromkeys(plan.sampled_ids(), TOKEN)), step + 0.5)
        for r in core.requests.values():
            assert r.num_output <= step + 1


def test_ecoserve_preempted_decode_is_scheduled_once() -> None:
    # 7 blocks of 4. r1 (predicted 2, true 28) outgrows its reservation at step 6; its growth
    # preempts r0, which was already scheduled as a decode (it used to come back in the same
    # step as both a decode at position 0 and a prefill [0, 9)).
    d = Driver(
        "ecoserve",
        [spec(num_blocks=7, block_size=4, token_budget=64)],
        reserve_share=0.0,
        lend_margin_tokens=0,
        collision_lookahead=0,
        synced_groups=False,
    )
    d.add("r0", prompt=3, target=9, predicted=9)
    d.add("r1", prompt=3, target=28, predicted=2)  # 31 tokens never fit 28
    d.run(100)
    assert d.core.requests["r0"].status is Status.FINISHED
    assert d.core.requests["r0"].num_output == 9
    assert d.finishes["r1"].startswith("failed")
    d.check_empty()


def test_ecoserve_extension_does_not_preempt_when_the_exact_need_fits() -> None:
    # 10 blocks of 16: a reserves 2 (16 + 16 tokens) and needs 3 (16 + 20); b reserves 7.
    # One block stays free: enough for a. Its extension used to ask for need + 32 tokens
    # (5 blocks) and preempt b instead.
    d = Driver(
        "ecoserve", [spec(num_blocks=10, block_size=16, token_budget=256)], reserve_share=0.0
    )
    d.add("a", prompt=16, target=20, predicted=16)
    d.add("b", prompt=16, target=90, predicted=96)
    d.step()
    assert [len(ledger_of(d).table(k)) for k in "ab"] == [2, 7] and ledger_of(d).num_free == 1
    d.run()
    d.check_done()
    assert d.core.counters.preemptions == 0 and d.core.counters.extensions >= 1


def test_ecoserve_lone_under_predicted_request_that_fits_finishes() -> None:
    # 23 of 36 tokens. It used to ask for need + 32 tokens, preempt itself, and fail on
    # re-admission with its re-bucketed prediction.
    d = Driver("ecoserve", [spec(num_blocks=9, block_size=4, token_budget=64)], reserve_share=0.0)
    d.add("a", prompt=3, target=20, predicted=2)
    d.run(200)
    d.check_done()
    assert d.core.counters.preemptions == 0


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_request_outgrowing_the_kv_cache_fails_with_a_reason(policy: str) -> None:
    # 10 blocks of 16 = 160 tokens; the prompt fits, prompt + output (250) does not. vLLM and
    # SJF used to preempt and recompute it forever.
    d = Driver(policy, [spec(num_blocks=10, block_size=16, token_budget=64)])
    d.add("big", prompt=100, target=150, predicted=20, max_tokens=200)
    d.add("small", prompt=10, target=5)
    d.run(max_steps=2000)
    r = d.core.requests["big"]
    assert r.status is Status.FAILED and r.finish_reason.startswith("failed"), r.finish_reason
    assert d.finishes["big"] == r.finish_reason
    assert d.core.requests["small"].status is Status.FINISHED
    d.check_empty()


def test_sarathi_prompt_within_the_watermark_gap_ends() -> None:
    # 99 of 100 blocks plus the 1% watermark: it used to wait forever, blocking b behind it.
    d = Driver("sarathi", [spec(num_blocks=100, block_size=16, token_budget=512)])
    d.add("a", prompt=1590, target=5, max_tokens=8)
    d.add("b", prompt=10, target=5)
    d.run(max_steps=500)
    d.check_done()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_request_too_big_for_one_worker_runs_on_the_bigger_one(policy: str) -> None:
    # It used to fail on the small worker although the big one could hold it.
    d = Driver(policy, [spec(num_blocks=8, wid="small"), spec(num_blocks=64, wid="big")])
    d.add("a", prompt=300, target=5, max_tokens=8)
    d.add("b", prompt=20, target=5)
    d.run()
    d.check_done()
    assert {s.request_id for p in d.plans if p.worker_id == "big" for s in p.seqs} >= {"a"}


def test_no_per_request_state_survives_release() -> None:
    d = Driver("ecoserve", [spec(num_blocks=64)])
    for i in range(3):
        d.add(f"waiting{i}", prompt=10, target=5, deadline=100.0)
    d.add("running", prompt=10, target=50)
    d.add("failing", prompt=10, target=50)
    d.step()
    for i in range(3):
        d.abort(f"waiting{i}")
    d.abort("running")
    for _ in range(3):
        plan = d.schedule()
        if plan is not None:
            d.apply(d.result(plan, error="boom"))
    d.run()
    assert d.core.requests["failing"].status is Status.FAILED
    for rid in list(d.core.requests):
        d.core.release(rid)
    assert not d.core.requests
    assert not d.core._step_failures
    assert not d.core.policy.queue._latest  # type: ignore[attr-defined]
