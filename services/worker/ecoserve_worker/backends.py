"""What a worker runs a BatchPlan on: a real model (ModelBackend), the cost model (SimBackend), or
nothing at all (EchoBackend, to time the wire).

Both answer `execute(plan) -> StepResult` (one token per id of `plan.sampled_ids()`, in order) and
`info() -> dict` with the facts the Register message carries. A backend never raises out of
`execute`: a failed step comes back as a StepResult with `error` set, so the scheduler can
recompute its requests and the worker keeps serving.

torch is imported only by ModelBackend, so a sim worker starts fast and small (a scale test runs
dozens of them on one machine).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecoserve_common.cost import CostModel, load_profile
from ecoserve_common.plan import BatchPlan, StepResult
from ecoserve_common.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

    from .model_runner import ModelRunner

log = logging.getLogger(__name__)

DEFAULT_MAX_GENERATORS = 4096  # seeded requests whose sampling state a worker keeps


class ModelBackend:
    """Runs each plan as one forward pass of a ModelRunner over its paged KV pool."""

    def __init__(
        self,
        runner: ModelRunner,
        token_budget: int = 512,
        model_id: str | None = None,
        max_generators: int = DEFAULT_MAX_GENERATORS,
    ) -> None:
        from .model_runner import make_generator, sample  # torch only when a model runs

        self.runner = runner
        self.token_budget = token_budget
        self.model_id = model_id or _model_id(runner)
        self.max_generators = max_generators
        self._sample = sample
        self._make_generator = make_generator
        # Per-request seeded generators, least recently used first. A request's generator lives
        # across steps so its samples are reproducible whatever else shares the batch.
        self._generators: OrderedDict[str, torch.Generator] = OrderedDict()

    def info(self) -> dict[str, Any]:
        cfg = self.runner.config
        return {
            "model_id": self.model_id,
            "block_size": self.runner.block_size,
            "num_blocks": self.runner.num_blocks,
            "token_budget": self.token_budget,
            "device": str(self.runner.device),
            "max_model_len": int(getattr(cfg, "max_position_embeddings", 0) or 0),
        }

    def execute(self, plan: BatchPlan) -> StepResult:
        start = time.perf_counter()
        try:
            tokens = self._run(plan)
        except Exception as exc:  # a bad plan or a device error fails the step, not the worker
            log.exception("step %d failed", plan.step_id)
            error = f"{type(exc).__name__}: {exc}"
            return StepResult(plan.step_id, plan.worker_id, (), time.perf_counter() - start, error)
        return StepResult(plan.step_id, plan.worker_id, tokens, time.perf_counter() - start)

    def _run(self, plan: BatchPlan) -> list[int]:
        self.runner.copy_blocks(plan.block_copies)
        seqs, sampling = _step_inputs(plan)
        logits = self.runner.step(seqs)
        if all(sp is None or sp.temperature <= 0 for _, sp in sampling):
            # All greedy (the common case): one argmax over the batch, not one per row.
            picks = logits.argmax(-1).tolist()
            return [tok for tok, (_, sp) in zip(picks, sampling, strict=True) if sp is not None]
        return [
            self._sample_one(logits[i], rid, sp)
            for i, (rid, sp) in enumerate(sampling)
            if sp is not None
        ]

    def _sample_one(self, logits: torch.Tensor, request_id: str, sp: SamplingParams) -> int:
        gen = None
        if sp.temperature > 0 and sp.seed is not None:
            gen = self._generator(request_id, sp.seed)
        return self._sample(logits, sp.temperature, sp.top_p, sp.top_k, gen)

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = self._make_generator(seed, self.runner.device)
            self._generators[request_id] = gen
            while len(self._generators) > self.max_generators:
                self._generators.popitem(last=False)
        else:
            self._generators.move_to_end(request_id)
        return gen


def _step_inputs(plan: BatchPlan):
    """The runner's sequences (decodes first, then prefill chunks) and, for each, the sampling
    params when it samples this step (None for a prefill chunk that does not)."""
    d = plan.decodes
    if len(d) and d.token_ids is None:
        raise ValueError("plan has no decode token ids (a simulator plan cannot run on a model)")
    seqs: list = []
    sampling: list[tuple[str, SamplingParams | None]] = []
    for i, rid in enumerate(d.request_ids):
        seqs.append((rid, (d.token_ids[i],), d.positions[i], d.block_tables[i]))
        sampling.append((rid, d.sampling[i]))
    for s in plan.prefills:
        if s.token_ids is None:
            raise ValueError(f"prefill of {s.request_id} has no token ids")
        seqs.append((s.request_id, s.token_ids, s.start_pos, s.block_table))
        sampling.append((s.request_id, s.sampling if s.sample else None))
    return seqs, sampling


def _model_id(runner: ModelRunner) -> str:
    name = getattr(runner.config, "_name_or_path", "") or ""
    return Path(name).name or runner.config.model_type


class SimBackend:
    """No model: each step takes the time the cost model predicts for the plan's shape, and every
    sampled id gets token 1. `sleep` is injectable so tests need not wait."""

    def __init__(
        self,
        profile_name: str,
        num_blocks: int,
        block_size: int = 16,
        token_budget: int = 512,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        self.profile = load_profile(profile_name)
        self.cost_model = CostModel(self.profile)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.token_budget = token_budget
        self.sleep = sleep

    def info(self) -> dict[str, Any]:
        return {
            "model_id": self.profile.name,
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "token_budget": self.token_budget,
            "device": "sim",
            "max_model_len": self.profile.max_model_len,
        }

    def execute(self, plan: BatchPlan) -> StepResult:
        try:
            seconds = self.cost_model.iteration_time(plan.shape())
            self.sleep(seconds)
            tokens = [1] * len(plan.sampled_ids())
        except Exception as exc:
            log.exception("sim step %d failed", plan.step_id)
            return StepResult(plan.step_id, plan.worker_id, (), 0.0, f"{type(exc).__name__}: {exc}")
        # forward_s is the modelled time: what the step "took" on the simulated accelerator.
        return StepResult(plan.step_id, plan.worker_id, tokens, seconds)


class EchoBackend:
    """No model and no sleep: every sampled id gets token 1 at once. It is the worker's whole
    receive -> decode -> execute -> encode -> send path with nothing inside, so the time a
    scheduler sees per plan is the wire's own cost (the bench's ZeroMQ round trip)."""

    def __init__(self, num_blocks: int, block_size: int = 16, token_budget: int = 512) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.token_budget = token_budget

    def info(self) -> dict[str, Any]:
        return {
            "model_id": "echo",
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "token_budget": self.token_budget,
            "device": "echo",
            "max_model_len": 0,
        }

    def execute(self, plan: BatchPlan) -> StepResult:
        return StepResult(plan.step_id, plan.worker_id, [1] * len(plan.sampled_ids()), 0.0)
