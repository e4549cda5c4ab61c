"""SchedulerCore: the one owner of scheduling state, shared by the live service and the simulator.

    core.add(request, now)              # after prediction
    plan = core.schedule(worker, now)   # -> BatchPlan | None
    events = core.apply(result, now)    # -> TokenEvent / FinishEvent / PreemptEvent
    core.abort(request_id, now)

Pure logic: no I/O, no clock (time is passed in). The mechanism lives here (ledger updates,
preemption, token bookkeeping); every decision that differs between systems (queue order, what
to reserve, whom to evict, KV lending) is a policy hook (see policies/base.py).

Invariant: a worker has at most one plan in flight; `schedule` for a worker is only called after
the previous plan's result was applied, so nothing a plan references changes under it except
through abort (whose late tokens are ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ecoserve_common.plan import BatchPlan, DecodeBatch, ScheduledSeq, StepResult

from .events import Event, FinishEvent, PreemptEvent, TokenEvent
from .iter_model import IterTimeModel
from .ledger import KVLedger, Usage
from .placement import Placement, make_placement
from .request import Request, Status

MAX_STEP_FAILURES = 3  # a request in this many failed steps fails instead of being retried


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    num_blocks: int
    block_size: int = 16
    token_budget: int = 512
    max_num_seqs: int = 256
    max_model_len: int = 4096


@dataclass
class WorkerState:
    spec: WorkerSpec
    ledger: KVLedger
    running: dict[str, Request] = field(default_factory=dict)  # admission order
    decoding: dict[str, Request] = field(default_factory=dict)  # of running: prefill done
    in_flight: BatchPlan | None = None
    in_flight_reqs: list[Request] = field(default_factory=list)  # aligned with its decodes
    sent_s: float = 0.0
    iter_model: IterTimeModel = field(default_factory=IterTimeModel)


@dataclass
class Counters:
    admitted: int = 0
    finished: int = 0
    failed: int = 0
    aborted: int = 0
    preemptions: int = 0
    extensions: int = 0
    loans: int = 0
    guest_moves: int = 0
    guest_preemptions: int = 0
    steps: int = 0
    step_errors: int = 0


class SchedulerCore:
    def __init__(self, policy, placement: Placement | str | None = None) -> None:
        """`placement`: a Placement, a registered name, or None for the default
        (core/placement.py); it picks the worker a waiting prompt task runs on."""
        self.policy = policy
        if not isinstance(placement, Placement):
            placement = make_placement(placement) if placement else make_placement()
        self.placement = placement
        # This share of each worker's blocks is held back for extensions and guest moves.
        self.reserve_share = policy.reserve_share
        self.workers: dict[str, WorkerState] = {}
        self.requests: dict[str, Request] = {}
        self.counters = Counters()
        self.num_waiting = 0
        self.iter_time_ema_s = 0.0  # measured from schedule->apply, seeds slack estimates
        self._step_ids = 0
        self._step_failures: dict[str, int] = {}
        self._outbox: list[Event] = []  # events raised while scheduling (preemptions, failures)

    # ---- workers ---------------------------------------------------------------------------

    def add_worker(self, spec: WorkerSpec) -> None:
        if spec.worker_id in self.workers:
            raise ValueError(f"worker {spec.worker_id} already registered")
        reserve = int(spec.num_blocks * self.reserve_share)
        ledger = KVLedger(spec.num_blocks, spec.block_size, reserve)
        self.workers[spec.worker_id] = WorkerState(spec, ledger)

    def remove_worker(self, worker_id: str, now: float) -> list[Event]:
        """Drop a worker (dead or drained): its requests are recomputed elsewhere."""
        w = self.workers.pop(worker_id)
        events: list[Event] = []
        for r in list(w.running.values()):
            events.append(self._preempt(w, r, now, "worker removed"))
        return events

    # ---- requests --------------------------------------------------------------------------

    def add(self, r: Request, now: float) -> list[Event]:
        """Queue a request (after prediction). A request no worker could ever hold fails now."""
        if r.request_id in self.requests:
            raise ValueError(f"duplicate request id {r.request_id}")
        self.requests[r.request_id] = r
        why = self._unservable(r)
        if why:
            return [self._fail(r, now, why)]
        r.status = Status.WAITING
        self.num_waiting += 1
        self.policy.push(r, now, self)
        return []

    def abort(self, request_id: str, now: float) -> list[Event]:
        r = self.requests.get(request_id)
        if r is None or r.status.done:
            return []
        if r.status is Status.WAITING:
            self.num_waiting -= 1  # the queue drops it lazily
        else:
            self._release(r)
        r.status, r.finished_s, r.finish_reason = Status.ABORTED, now, "aborted"
        self.counters.aborted += 1
        self._forget(r, now)
        return [FinishEvent(request_id, "aborted")]

    def release(self, request_id: str) -> None:
        """Forget a finished request (the shell calls this once it has reported it)."""
        r = self.requests.get(request_id)
        if r is not None and r.status.done:
            del self.requests[request_id]

    # ---- one iteration ---------------------------------------------------------------------

    def schedule(self, worker_id: str, now: float) -> BatchPlan | None:
        w = self.workers[worker_id]
        if w.in_flight is not None:
            raise RuntimeError(
                f"worker {worker_id} already has step {w.in_flight.step_id} in flight"
            )
        step = Step(self, w, now)
        self.policy.schedule(step)
        if not step.prefills and not step.decode_ids:
            return None
        self._step_ids += 1
        plan = BatchPlan(
            self._step_ids, worker_id, step.decode_batch(), tuple(step.prefills), tuple(step.copies)
        )
        w.in_flight, w.in_flight_reqs, w.sent_s = plan, step.decode_reqs, now
        return plan

    def apply(self, result: StepResult, now: float) -> list[Event]:
        w = self.workers.get(result.worker_id)
        if w is None or w.in_flight is None or w.in_flight.step_id != result.step_id:
            return []  # a late result from a removed worker or an old step
        plan, w.in_flight = w.in_flight, None
        self.counters.steps += 1
        dt = now - w.sent_s
        ema = self.iter_time_ema_s
        self.iter_time_ema_s = dt if not ema else 0.9 * ema + 0.1 * dt
        shape = plan.shape()
        ctx = shape.decode_context_tokens + sum(c for _, c in shape.prefill_chunks)
        w.iter_model.observe(plan.num_tokens, ctx, dt)
        events = self.take_events()
        if result.error:
            return events + self._step_failed(w, plan, now, result.error)
        tokens = result.tokens
        n_dec = len(plan.decodes)
        if len(tokens) != n_dec + sum(1 for p in plan.prefills if p.sample):
            return events + self._step_failed(w, plan, now, "result has the wrong token count")
        wid, running, append = w.spec.worker_id, Status.RUNNING, events.append
        new = tuple.__new__  # builds a TokenEvent at half the cost of calling the NamedTuple
        # Decodes: the hot loop. `w.in_flight_reqs` is aligned with plan.decodes.
        for r, token in zip(w.in_flight_reqs, tokens, strict=False):
            if r.status is not running or r.worker_id != wid:
                continue  # aborted or preempted while in flight
            r.num_computed += 1
            out = r.output_token_ids
            out.append(token)
            n = len(out)
            append(new(TokenEvent, (r.request_id, token, n - 1)))
            if token == r.eos_token_id or n >= r.output_cap or r.sampling.stop_token_ids:
                self._maybe_stop(w, r, token, now, events)
        # Prefill chunks; the last chunk of a prompt samples the first token.
        sampled = iter(tokens[n_dec:])
        for s in plan.prefills:
            pr = self.requests.get(s.request_id)
            first = next(sampled) if s.sample else None
            if pr is None or pr.status is not running or pr.worker_id != wid:
                continue
            pr.num_computed = s.start_pos + s.num_tokens
            if first is None:
                continue
            pr.output_token_ids.append(first)
            w.decoding[pr.request_id] = pr
            if pr.first_token_s is None:
                pr.first_token_s = now
            append(TokenEvent(pr.request_id, first, pr.num_output - 1))
            self._maybe_stop(w, pr, first, now, events)
        return events

    def _maybe_stop(self, w: WorkerState, r: Request, token: int, now: float, events) -> None:
        sp = r.sampling
        if token == r.eos_token_id and not sp.ignore_eos or token in sp.stop_token_ids:
            events.append(self._finish(w, r, now, "stop"))
        elif r.num_output >= r.output_cap:
            events.append(self._finish(w, r, now, "length"))

    def take_events(self) -> list[Event]:
        """Events raised while scheduling (preemptions, failures), oldest first."""
        events, self._outbox = self._outbox, []
        return events

    # ---- mechanism used by policies (through Step) -----------------------------------------

    def _unservable(self, r: Request) -> str | None:
        if not self.workers:
            return None  # workers may register later; checked again at admission
        if all(r.prompt_len >= w.spec.max_model_len for w in self.workers.values()):
            return "failed: prompt longer than the model's context"
        need = max(w.ledger.blocks_for(r.prompt_len + 1) for w in self.workers.values())
        if all(need > w.ledger.num_blocks - w.ledger.reserve_blocks for w in self.workers.values()):
            return "failed: prompt larger than any worker's KV cache"
        return None

    def _admit(self, w: WorkerState, r: Request, now: float) -> None:
        r.status, r.worker_id = Status.RUNNING, w.spec.worker_id
        r.output_cap = min(r.sampling.max_tokens, w.spec.max_model_len - r.prompt_len)
        if r.admitted_s is None:
            r.admitted_s = now
        w.running[r.request_id] = r
        self.num_waiting -= 1
        self.counters.admitted += 1

    def _release(self, r: Request) -> None:
        w = self.workers.get(r.worker_id) if r.worker_id else None
        if w is not None:
            w.running.pop(r.request_id, None)
            w.decoding.pop(r.request_id, None)
            if w.ledger.has(r.request_id):
                w.ledger.free(r.request_id)
        r.worker_id = None

    def _finish(self, w: WorkerState, r: Request, now: float, reason: str) -> FinishEvent:
        self._release(r)
        r.status, r.finished_s, r.finish_reason = Status.FINISHED, now, reason
        self.counters.finished += 1
        self._forget(r, now)
        return FinishEvent(r.request_id, reason)

    def _fail(self, r: Request, now: float, reason: str) -> FinishEvent:
        """Fail a request that holds no blocks (release it first)."""
        r.status, r.finished_s, r.finish_reason = Status.FAILED, now, reason
        self.counters.failed += 1
        self._forget(r, now)
        return FinishEvent(r.request_id, reason)

    def _forget(self, r: Request, now: float) -> None:
        """Drop every piece of per-request state but the Request itself (`release` drops it)."""
        self._step_failures.pop(r.request_id, None)
        self.policy.on_done(r, now)
        self.placement.on_done(r.request_id)

    def _preempt(self, w: WorkerState, r: Request, now: float, reason: str) -> PreemptEvent:
        """Recompute preemption: drop r's KV; it waits again with its outputs kept."""
        self._release(r)
        r.status, r.num_computed = Status.WAITING, 0
        r.preemptions += 1
        self.counters.preemptions += 1
        self.num_waiting += 1
        self.policy.requeue(r, now, self)
        return PreemptEvent(r.request_id, reason)

    def _step_failed(self, w: WorkerState, plan: BatchPlan, now: float, error: str) -> list[Event]:
        self.counters.step_errors += 1
        events: list[Event] = []
        for rid in list(plan.decodes.request_ids) + [s.request_id for s in plan.prefills]:
            r = self.requests.get(rid)
            if r is None or r.status is not Status.RUNNING:
                continue
            n = self._step_failures[r.request_id] = self._step_failures.get(r.request_id, 0) + 1
            if n >= MAX_STEP_FAILURES:
                self._release(r)
                events.append(self._fail(r, now, f"failed: worker error: {error}"))
            else:
                events.append(self._preempt(w, r, now, f"worker error: {error}"))
        return events

    # ---- reporting -------------------------------------------------------------------------

    def usage(self) -> dict[str, Usage]:
        return {wid: w.ledger.usage() for wid, w in self.workers.items()}

    def stats(self) -> dict:
        c = self.counters
        return {
            "policy": self.policy.name,
            "waiting": self.num_waiting,
            "running": {wid: len(w.running) for wid, w in self.workers.items()},
            "kv": {
                wid: {
                    "num_blocks": u.num_blocks,
                    "blocks_used": u.blocks_used,
                    "blocks_lent": u.blocks_lent,
                    "tokens_written": u.tokens_written,
                    "reserved_share": round(u.reserved_share, 4),
                }
                for wid, u in self.usage().items()
            },
            **{k: getattr(c, k) for k in c.__dataclass_fields__},
            "placement": self.placement.name,
        }


class Step:
    """The iteration being built for one worker: token budget, chosen chunks, block moves.

    Policies call `run_decodes` and `run` (after `make_room`) for what they schedule; these keep
    the ledger, the budget and the plan consistent."""

    def __init__(self, core: SchedulerCore, w: WorkerState, now: float) -> None:
        self.core = core
        self.w = w
        self.ledger = w.ledger
        self.now = now
        self.budget = w.spec.token_budget
        self.prefills: list[ScheduledSeq] = []
        self.decode_ids: list[str] = []
        self.decode_reqs: list[Request] = []
        self.copies: list[tuple[int, int]] = []
        self._scheduled: set[str] = set()  # prefill chunks only; decodes are in decode_ids
        self._dropped = False  # a scheduled request was preempted: filter the columns
        self.preempted = 0  # requests preempted (or failed) while building this step
        self.placement_cache: list | None = None  # the placement's per-step cache

    @property
    def running(self) -> dict[str, Request]:
        return self.w.running

    @property
    def num_seqs(self) -> int:
        return len(self.decode_ids) + len(self.prefills)

    @property
    def full(self) -> bool:
        return self.budget <= 0 or self.num_seqs >= self.w.spec.max_num_seqs

    def chunk(self, r: Request, chunked: bool = True) -> int:
        """Tokens of r this step can take: all pending ones, or a budget-sized chunk. Without
        chunking (Orca) the token budget does not apply: a prompt always runs whole."""
        n = r.pending
        if n <= self.budget or not chunked:
            return n
        return self.budget

    def run_decodes(self, decodes: list[Request]) -> list[Request]:
        """Schedule one token for each decoding request that has room (the hot path: a few
        attribute reads per request). Returns those that need `make_room` first."""
        decodes = decodes[: max(0, self.budget)]
        limit = self.ledger.limit
        ok = [r for r in decodes if r.num_computed < limit[r.request_id]]
        blocked = []
        if len(ok) < len(decodes):
            blocked = [r for r in decodes if r.num_computed >= limit[r.request_id]]
        self._add_decodes(ok)
        return blocked

    def _add_decodes(self, reqs: list[Request]) -> None:
        ids = [r.request_id for r in reqs]
        self.ledger.advance_decodes(ids)
        self.decode_ids.extend(ids)
        self.decode_reqs.extend(reqs)
        self.budget -= len(ids)

    def run(self, r: Request, n: int) -> None:
        """Schedule n tokens of r (a prefill chunk, or a decode that needed make_room)."""
        if r.request_id in self.w.decoding:
            self.ledger.advance(r.request_id, r.num_computed + 1)
            self.decode_ids.append(r.request_id)
            self.decode_reqs.append(r)
            self.budget -= 1
            return
        start = r.num_computed
        end = start + n
        rid = r.request_id
        self.ledger.advance(rid, end)
        self._scheduled.add(rid)
        ids = r.token_ids(start, end) if r.prompt_token_ids is not None else None
        table = tuple(self.ledger.table(rid))
        sample = end == r.prompt_len + len(r.output_token_ids)
        self.prefills.append(ScheduledSeq(rid, start, n, table, sample, r.sampling, ids))
        self.budget -= n

    def decode_batch(self) -> DecodeBatch:
        if self._dropped:
            keep = [r for r in self.decode_reqs if r.status is Status.RUNNING]
            self.decode_reqs, self.decode_ids = keep, [r.request_id for r in keep]
        reqs = self.decode_reqs
        tables = self.ledger.table
        with_ids = bool(reqs) and reqs[0].prompt_token_ids is not None
        return DecodeBatch(
            tuple(self.decode_ids),
            tuple([r.num_computed for r in reqs]),
            tuple([tables(r.request_id) for r in reqs]),
            tuple([r.sampling for r in reqs]),
            tuple([r.output_token_ids[-1] for r in reqs]) if with_ids else None,
        )

    def admit(self, r: Request) -> None:
        self.core._admit(self.w, r, self.now)

    def preempt(self, r: Request, reason: str) -> None:
        """Preempt r (recompute), removing it from this step if it was already scheduled."""
        self._unschedule(r)
        self.core._outbox.append(self.core._preempt(self.w, r, self.now, reason))

    def fail_running(self, r: Request, reason: str) -> None:
        """Fail a running request that can never fit (its blocks are released)."""
        self._unschedule(r)
        self.core._release(r)
        self.core._outbox.append(self.core._fail(r, self.now, reason))

    def _unschedule(self, r: Request) -> None:
        self.preempted += 1
        rid = r.request_id
        if rid in self._scheduled:
            self._scheduled.discard(rid)
            i = next(i for i, s in enumerate(self.prefills) if s.request_id == rid)
            self.budget += self.prefills.pop(i).num_tokens
        elif rid in self.w.decoding:
            self._dropped = True  # decode_batch filters it out if it was scheduled

    def fail_waiting(self, r: Request, reason: str) -> None:
        """Fail a waiting request (already popped from its queue) that no worker can hold."""
        self.core.num_waiting -= 1
        self.core._outbox.append(self.core._fail(r, self.now, reason))
