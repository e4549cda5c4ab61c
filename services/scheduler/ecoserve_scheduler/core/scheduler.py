"""SchedulerCore: the one owner of scheduling state, shared by the live service and the simulator.

    core.add(request, now)                     # after prediction
    plan, events = core.schedule(worker, now)  # -> ScheduleOutput(BatchPlan | None, events)
    events = core.update(result, now)          # -> TokenEvent / FinishEvent / PreemptEvent
    core.abort(request_id, now)

vLLM v1's schedule()/update_from_output() contract, one iteration top to bottom in this file:
guest collisions, decodes, running prefills, admissions (the loop is in core/admit.py; a
prefill-first policy, vLLM v0, runs it before the decodes and skips them in a step that admits);
growing a block table (grow, else evict a victim) and the request lifecycle. Pure logic: no
I/O, no clock (time is passed in). What differs between systems (queue order, what to reserve,
the prefill budget, whom to evict, KV lending) is a policy hook (policies/base.py) called with
what it needs.

Invariant: a worker has at most one plan in flight; `schedule` for a worker is only called after
the previous plan's result was applied, so nothing a plan references changes under it except
through abort (whose late tokens are ignored).
"""

from __future__ import annotations

from ecoserve_common.plan import BatchPlan, StepResult

from .admit import admit
from .events import Event, FinishEvent, PreemptEvent, TokenEvent
from .ledger import KVLedger, Usage
from .placement import Placement, make_placement
from .policies.base import Policy
from .request import Request, Status
from .state import Counters, ScheduleOutput, WorkerSpec, WorkerState
from .step import Step

MAX_STEP_FAILURES = 3  # a request in this many failed steps fails instead of being retried


class SchedulerCore:
    def __init__(self, policy: Policy, placement: Placement | str | None = None) -> None:
        """`placement`: a Placement, a registered name, or None for the default
        (core/placement.py); it picks the worker a waiting prompt task runs on."""
        self.policy = policy
        if not isinstance(placement, Placement):
            placement = make_placement(placement) if placement else make_placement()
        self.placement = placement
        self.workers: dict[str, WorkerState] = {}
        self.requests: dict[str, Request] = {}
        self.counters = Counters()
        self.num_waiting = 0
        self.iter_time_ema_s = 0.0  # measured from schedule->update, seeds slack estimates
        self._step_ids = 0
        self._step_failures: dict[str, int] = {}

    # ---- workers and requests --------------------------------------------------------------

    def add_worker(self, spec: WorkerSpec) -> None:
        if spec.worker_id in self.workers:
            raise ValueError(f"worker {spec.worker_id} already registered")
        # This share of each worker's blocks is held back for extensions and guest moves.
        reserve = int(spec.num_blocks * self.policy.admission.reserve_share)
        self.workers[spec.worker_id] = WorkerState(
            spec, KVLedger(spec.num_blocks, spec.block_size, reserve)
        )

    def drain_worker(self, worker_id: str) -> None:
        """The worker is leaving: from now on it admits nothing and the others' placement no
        longer waits for it; what runs there keeps being scheduled there until it finishes,
        then the shell removes it (nothing to recompute)."""
        self.workers[worker_id].draining = True

    def remove_worker(self, worker_id: str, now: float) -> list[Event]:
        """Drop a worker (dead or drained): its requests are recomputed elsewhere."""
        w = self.workers.pop(worker_id)
        return [self._preempt(r, now, "worker removed") for r in list(w.running.values())]

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
        self.policy.queue.push(r, now, self.iter_time_ema_s)
        return []

    def abort(self, request_id: str, now: float) -> list[Event]:
        r = self.requests.get(request_id)
        if r is None or r.status.done:
            return []
        if r.status is Status.WAITING:
            self.unwait(r)  # the queue drops it lazily
        else:
            self._release(r)
        r.status, r.finished_s, r.finish_reason = Status.ABORTED, now, "aborted"
        self.counters.aborted += 1
        self._forget(r)
        return [FinishEvent(request_id, "aborted")]

    def unwait(self, r: Request) -> None:
        """r leaves the waiting requests (admitted, failed or aborted)."""
        self.num_waiting -= 1

    def release(self, request_id: str) -> None:
        """Forget a finished request (the shell calls this once it has reported it)."""
        r = self.requests.get(request_id)
        if r is not None and r.status.done:
            del self.requests[request_id]

    # ---- schedule: build one step for a worker ---------------------------------------------

    def schedule(self, worker_id: str, now: float) -> ScheduleOutput:
        """Decodes first (each takes one token), then running prefills, then admissions.

        vLLM v1 visits running requests in admission order instead; the two differ only when an
        earlier-admitted request is still prefilling, which after admission-order prefill is
        only a recomputing request, so every policy shares this order (Sarathi's stall-free
        batching), except a `prefill_first` one (vLLM v0): admissions first, no decodes if any."""
        w = self.workers[worker_id]
        if w.in_flight is not None:
            raise RuntimeError(f"worker {worker_id} already has step {w.in_flight.step_id} out")
        policy, step = self.policy, Step(w, now, self.iter_time_ema_s, self.workers)
        policy.queue.begin_step()
        # 1. KVCPipe: a host about to write into its loan first has the guest moved away.
        ledger, lookahead = w.ledger, policy.lending.collision_lookahead
        for host_id in ledger.hosts():
            need = ledger.written(host_id) + 1 + lookahead
            while ledger.guests_of(host_id) and ledger.writable(host_id) < need:
                self._evict_guest(step, self.requests[ledger.guests_of(host_id)[0]])
        # vLLM v0 (`prefill_first`): admissions come first; a step that admits runs no decode.
        alone = policy.prefill_first and admit(self, step, policy.budget.prefill_budget(step))
        # 2. Decodes: one token each; those whose table is full grow (or evict) first.
        for r in step.run_decodes([] if alone else list(w.decoding.values())):
            live = r.status is Status.RUNNING and not step.full
            if live and self._make_room(step, r, r.num_computed + 1):
                step.run(r, 1)
        step.context_tokens += sum(r.num_computed for r in step.decode_reqs)
        step.budget = policy.budget.prefill_budget(step)
        # 3. Running prefills, in the policy's order, a chunk each.
        prefills = [r for r in w.running.values() if r.request_id not in w.decoding]
        for r in policy.queue.prefill_order(step, prefills):
            if r.status is not Status.RUNNING or step.full:
                continue  # preempted as a victim earlier in this loop
            n = step.chunk(r, policy.chunked)
            if n and (
                r.num_computed + n <= ledger.limit[r.request_id]
                or self._make_room(step, r, r.num_computed + n)
            ):
                step.run(r, n)
        # 4. Admissions, in queue order (core/admit.py).
        admit(self, step)
        if not step.prefills and not step.decode_ids:
            return ScheduleOutput(None, step.events)
        self._step_ids += 1
        plan = BatchPlan(
            self._step_ids, worker_id, step.decode_batch(), tuple(step.prefills), tuple(step.copies)
        )
        w.in_flight, w.in_flight_reqs, w.sent_s = plan, step.decode_reqs, now
        return ScheduleOutput(plan, step.events)

    def _make_room(self, step: Step, r: Request, tokens: int) -> bool:
        """Make r's writable region hold `tokens`; False if r had to be preempted or failed."""
        ledger, rid = step.ledger, r.request_id
        while ledger.writable(rid) < tokens:
            guests = ledger.guests_of(rid)
            if guests:
                self._evict_guest(step, self.requests[guests[0]])
                continue
            if self._grow(step, r, tokens):
                continue
            if tokens > self.policy.capacity_tokens(ledger):
                step.unschedule(r)
                self._release(r)
                step.events.append(self._fail(r, step.now, "failed: sequence outgrew the KV cache"))
                return False
            victim = self.policy.victims.victim(step, r)
            if victim is None or victim is r:
                self._preempt_in_step(step, r, "out of KV cache")
                return False
            self._preempt_in_step(step, victim, f"KV cache needed by {rid}")
        return True

    def _grow(self, step: Step, r: Request, tokens: int) -> bool:
        """Lengthen r's table: to the policy's growth target, else to the exact need; from
        free blocks first, then (if the policy may) the reserve pool. A guest moves instead."""
        ledger, rid, admission = step.ledger, r.request_id, self.policy.admission
        targets = dict.fromkeys(
            (ledger.blocks_for(admission.growth_tokens(r, tokens)), ledger.blocks_for(tokens))
        )
        for use_reserve in (False, True) if admission.use_reserve else (False,):
            for want in targets:
                if ledger.is_guest(rid):
                    copies = ledger.move_guest(rid, want, use_reserve=use_reserve)
                    if copies is not None:
                        step.copies.extend(copies)
                        self.counters.guest_moves += 1
                        return True
                elif ledger.extend(rid, want - len(ledger.table(rid)), use_reserve=use_reserve):
                    self.counters.extensions += 1
                    r.extensions += 1
                    return True
        return False

    def _evict_guest(self, step: Step, guest: Request) -> None:
        """Move a guest off its host's blocks (fresh blocks, then reserve), else preempt it."""
        ledger = step.ledger
        want = ledger.blocks_for(self.policy.admission.admission_tokens(guest, 0))
        copies = ledger.move_guest(guest.request_id, want, use_reserve=True)
        if copies is None:
            self.counters.guest_preemptions += 1
            self._preempt_in_step(step, guest, "KVCPipe collision: no free blocks to move to")
        else:
            step.copies.extend(copies)
            self.counters.guest_moves += 1

    def _preempt_in_step(self, step: Step, r: Request, reason: str) -> None:
        step.unschedule(r)
        step.events.append(self._preempt(r, step.now, reason))

    # ---- update: apply a step's result -----------------------------------------------------

    def update(self, result: StepResult, now: float) -> list[Event]:
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
        if result.error:
            return self._step_failed(plan, now, result.error)
        tokens = result.tokens
        n_dec = len(plan.decodes)
        logprobs = result.logprobs or (None,) * len(tokens)  # one per token
        if not len(tokens) == n_dec + sum(1 for p in plan.prefills if p.sample) == len(logprobs):
            return self._step_failed(plan, now, "result has the wrong token count")
        events: list[Event] = []
        wid, running, append = w.spec.worker_id, Status.RUNNING, events.append
        for rid, why in result.failed:  # a row whose sampling failed fails its request alone
            if (bad := self.requests.get(rid)) and bad.status is running and bad.worker_id == wid:
                self._release(bad)
                append(self._fail(bad, now, f"failed: sampling: {why}"))
        new = tuple.__new__  # builds a TokenEvent at half the cost of calling the NamedTuple
        # Decodes: the hot loop. `w.in_flight_reqs` is aligned with plan.decodes.
        for r, token, lp in zip(w.in_flight_reqs, tokens, logprobs, strict=False):
            if r.status is not running or r.worker_id != wid:
                continue  # aborted or preempted while in flight
            r.num_computed += 1
            out = r.output_token_ids
            out.append(token)
            n = len(out)
            append(new(TokenEvent, (r.request_id, token, n - 1, lp)))
            if token == r.eos_token_id or n >= r.output_cap or r.sampling.stop_token_ids:
                self._maybe_stop(r, token, now, events)
        # Prefill chunks; the last chunk of a prompt samples the first token.
        sampled = zip(tokens[n_dec:], logprobs[n_dec:], strict=True)
        for s in plan.prefills:
            pr = self.requests.get(s.request_id)
            first, lp = next(sampled) if s.sample else (None, None)
            if pr is None or pr.status is not running or pr.worker_id != wid:
                continue
            pr.num_computed = s.start_pos + s.num_tokens
            if first is None:
                continue
            pr.output_token_ids.append(first)
            w.decoding[pr.request_id] = pr
            if pr.first_token_s is None:
                pr.first_token_s = now
            append(TokenEvent(pr.request_id, first, pr.num_output - 1, lp))
            self._maybe_stop(pr, first, now, events)
        return events

    def _maybe_stop(self, r: Request, token: int, now: float, events: list[Event]) -> None:
        if r.stops_at(token):
            events.append(self._finish(r, now, "stop"))
        elif r.num_output >= r.output_cap:
            events.append(self._finish(r, now, "length"))

    def _step_failed(self, plan: BatchPlan, now: float, error: str) -> list[Event]:
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
                events.append(self._preempt(r, now, f"worker error: {error}"))
        return events

    # ---- request lifecycle -----------------------------------------------------------------

    def _unservable(self, r: Request) -> str | None:
        if not self.workers:
            return None  # workers may register later; checked again at admission
        if all(r.prompt_len >= w.spec.max_model_len for w in self.workers.values()):
            return "failed: prompt longer than the model's context"
        need = max(w.ledger.blocks_for(r.prompt_len + 1) for w in self.workers.values())
        if all(need > w.ledger.num_blocks - w.ledger.reserve_blocks for w in self.workers.values()):
            return "failed: prompt larger than any worker's KV cache"
        return None

    def _release(self, r: Request) -> None:
        w = self.workers.get(r.worker_id) if r.worker_id else None
        if w is not None:
            w.running.pop(r.request_id, None)
            w.decoding.pop(r.request_id, None)
            if w.ledger.has(r.request_id):
                w.ledger.free(r.request_id)
        r.worker_id = None

    def _finish(self, r: Request, now: float, reason: str) -> FinishEvent:
        self._release(r)
        r.status, r.finished_s, r.finish_reason = Status.FINISHED, now, reason
        self.counters.finished += 1
        self._forget(r)
        return FinishEvent(r.request_id, reason)

    def _fail(self, r: Request, now: float, reason: str) -> FinishEvent:
        """Fail a request that holds no blocks (release it first)."""
        r.status, r.finished_s, r.finish_reason = Status.FAILED, now, reason
        self.counters.failed += 1
        self._forget(r)
        return FinishEvent(r.request_id, reason)

    def _forget(self, r: Request) -> None:
        """Drop every piece of per-request state but the Request itself (`release` drops it)."""
        self._step_failures.pop(r.request_id, None)
        self.policy.queue.on_done(r)
        self.placement.on_done(r.request_id)

    def _preempt(self, r: Request, now: float, reason: str) -> PreemptEvent:
        """Recompute preemption: drop r's KV; it waits again with its outputs kept."""
        self._release(r)
        r.status, r.num_computed, r.on_demand = Status.WAITING, 0, False
        r.preemptions += 1
        self.counters.preemptions += 1
        self.num_waiting += 1
        self.policy.queue.requeue(r, now, self.iter_time_ema_s)
        return PreemptEvent(r.request_id, reason)

    # ---- reporting -------------------------------------------------------------------------

    def usage(self) -> dict[str, Usage]:
        return {wid: w.ledger.usage() for wid, w in self.workers.items()}

    def stats(self) -> dict[str, object]:
        return {
            "policy": self.policy.name,
            "waiting": self.num_waiting,
            "running": {wid: len(w.running) for wid, w in self.workers.items()},
            "kv": {wid: u.as_stats() for wid, u in self.usage().items()},
            **self.counters.as_dict(),
            "placement": self.placement.name,
        }


__all__ = ["MAX_STEP_FAILURES", "SchedulerCore", "ScheduleOutput", "WorkerSpec"]
