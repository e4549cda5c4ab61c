"""What a worker runs a step on: a real model (ModelBackend), the cost model (SimBackend), or
nothing at all (EchoBackend, to time the wire).

Each answers `execute(step) -> StepResult` (one token per id of `step.sampled_ids()`, in order)
and `info() -> dict` with the facts the Register message carries. The server passes the plan's
columns as they came off the wire (`StepInputs`); an in-process `BatchPlan` works too. A backend
never raises out of `execute`: a failed step comes back as a StepResult with `error` set, so the
scheduler can recompute its requests and the worker keeps serving; a step where only some rows'
sampling failed comes back with those rows in `failed` (their requests fail, the rest stand).

torch is imported only by ModelBackend, so a sim worker starts fast and small (a scale test runs
dozens of them on one machine).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecoserve_common.cost import CostModel, load_profile
from ecoserve_common.plan import BatchPlan, StepInputs, StepResult

if TYPE_CHECKING:
    from .model_runner import ModelRunner

log = logging.getLogger(__name__)

DEFAULT_MAX_GENERATORS = 4096  # seeded requests whose sampling state a worker keeps


class ModelBackend:
    """Runs each step as one forward pass of a ModelRunner over its paged KV pool."""

    def __init__(
        self,
        runner: ModelRunner,
        token_budget: int = 512,
        model_id: str | None = None,
        max_generators: int = DEFAULT_MAX_GENERATORS,
    ) -> None:
        from .sampling import RowErrors, Sampler  # torch only when a model runs

        self._row_errors = RowErrors

        self.runner = runner
        self.token_budget = token_budget
        self.model_id = model_id or _model_id(runner)
        # Per-request seeded generators and penalized requests' tokens live across steps
        # (sampling.py), so a request's samples are reproducible whatever else shares the batch.
        eos = eos_ids(getattr(runner, "config", None))  # a stub runner may have no config
        self.sampler = Sampler(runner.device, max_generators, eos)

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

    def execute(self, step: StepInputs | BatchPlan) -> StepResult:
        start = time.perf_counter()
        try:
            inp = step if isinstance(step, StepInputs) else StepInputs.from_plan(step)
            self.runner.copy_blocks(inp.block_copies)
            tokens, logprobs = self.sampler.sample_step(self.runner.forward(inp), inp)
        except self._row_errors as exc:  # some rows' sampling failed: only their requests fail
            log.warning("step %d: %s", step.step_id, exc)
            kept = [0 if t is None else t for t in exc.tokens]  # placeholders for failed rows
            elapsed = time.perf_counter() - start
            failed = tuple(exc.errors.items())
            return StepResult(
                step.step_id, step.worker_id, kept, elapsed, None, failed, exc.logprobs
            )
        except Exception as exc:  # a bad plan or a device error fails the step, not the worker
            log.exception("step %d failed", step.step_id)
            error = f"{type(exc).__name__}: {exc}"
            return StepResult(step.step_id, step.worker_id, (), time.perf_counter() - start, error)
        elapsed = time.perf_counter() - start
        return StepResult(step.step_id, step.worker_id, tokens, elapsed, None, (), logprobs)


def eos_ids(config: Any) -> tuple[int, ...]:
    """The model's EOS ids from its config (an int, a list, or None; no config: none)."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


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

    def execute(self, plan: StepInputs | BatchPlan) -> StepResult:
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

    def execute(self, plan: StepInputs | BatchPlan) -> StepResult:
        return StepResult(plan.step_id, plan.worker_id, [1] * len(plan.sampled_ids()), 0.0)
