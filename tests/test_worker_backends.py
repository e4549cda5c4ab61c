"""The worker's backends on their own (no socket): the sim backend sleeps the cost model's time,
echo answers at once, a model backend turns a failure into a step error and keeps seeded
sampling reproducible; and the CLI's arguments and start-up profiling. The process loop:
test_worker_server.py.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

# The same pool, prompts and core set-up as test_worker_server.py.
from test_worker_server import BLOCK, MAX_TOKENS, NUM_BLOCKS, make_core  # noqa: E402

from ecoserve_common.cost import CostModel, load_profile  # noqa: E402
from ecoserve_scheduler.core import (  # noqa: E402
    Request,
    SamplingParams,
    SchedulerCore,
    StepResult,
    WorkerSpec,
    make_policy,
)
from ecoserve_worker.__main__ import (  # noqa: E402
    DEFAULT_STEP_TARGET_MS,
    DEFAULT_TOKEN_BUDGET,
    build_parser,
    main,
    make_backend,
)
from ecoserve_worker.backends import EchoBackend, ModelBackend, SimBackend  # noqa: E402
from ecoserve_worker.model_runner import ModelRunner  # noqa: E402

PROFILE = "llama-2-7b/a100-80gb"
PROMPTS = {"short": [1, 40, 41, 42, 43, 44]}


@pytest.fixture(scope="module")
def runner(model_dir):
    return ModelRunner(model_dir, num_blocks=NUM_BLOCKS, block_size=BLOCK)


def sim_plans(steps: int = 5):
    """Plans from a core in simulator mode (no token ids), with their results applied."""
    core = SchedulerCore(make_policy("vllm"))
    core.add_worker(WorkerSpec("w0", num_blocks=256, block_size=16, token_budget=64))
    for i, n in enumerate((100, 30, 7)):
        core.add(Request(f"r{i}", n, 0.0, SamplingParams(max_tokens=4)), 0.0)
    for t in range(steps):
        plan = core.schedule("w0", float(t)).plan
        if plan is None:
            return
        yield plan
        core.update(StepResult(plan.step_id, "w0", [1] * len(plan.sampled_ids())), t + 0.5)


def test_sim_backend_sleeps_cost_model_time():
    slept: list[float] = []
    backend = SimBackend(PROFILE, 256, block_size=16, token_budget=64, sleep=slept.append)
    cost = CostModel(load_profile(PROFILE))
    expected = []
    for plan in sim_plans():
        result = backend.execute(plan)
        expected.append(cost.iteration_time(plan.shape()))
        assert result.tokens == [1] * len(plan.sampled_ids()) and result.error is None
        assert result.forward_s == expected[-1]
    assert slept == expected and all(t > 0 for t in slept)
    assert backend.info() == {
        "model_id": PROFILE,
        "block_size": 16,
        "num_blocks": 256,
        "token_budget": 64,
        "device": "sim",
        "max_model_len": load_profile(PROFILE).max_model_len,
    }


def test_echo_backend_answers_every_sampled_id():
    backend = EchoBackend(256)
    for plan in sim_plans():
        result = backend.execute(plan)
        assert result.tokens == [1] * len(plan.sampled_ids()) and result.error is None
    assert backend.info()["device"] == "echo"


def test_model_backend_failure_is_a_step_error(runner):
    backend = ModelBackend(runner)
    core = make_core({"short": PROMPTS["short"]})
    plan = core.schedule("w0", 0.0).plan
    broken = type(plan)(plan.step_id, "w0", plan.decodes, plan.prefills, ((0, NUM_BLOCKS + 5),))
    result = backend.execute(broken)
    assert result.error and result.tokens == () and result.step_id == plan.step_id


def test_seeded_sampling_is_reproducible(runner):
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=5.0, seed=7, ignore_eos=True)

    def run_once(max_generators: int = 16) -> list[int]:
        backend = ModelBackend(runner, max_generators=max_generators)
        core = make_core({"short": PROMPTS["short"]}, sp)
        for t in range(MAX_TOKENS):
            plan = core.schedule("w0", float(t)).plan
            core.update(backend.execute(plan), t + 0.5)
        assert list(backend.sampler.generators) == ["short"]
        return core.requests["short"].output_token_ids

    first = run_once()
    assert first == run_once() and len(first) == MAX_TOKENS
    assert len(set(first)) > 1  # temperature 5 over 512 tokens: not all one token


def test_generator_dict_is_lru_bounded(runner):
    backend = ModelBackend(runner, max_generators=2)
    for rid in ("a", "b", "a", "c"):
        backend.sampler.generator(rid, 1)
    assert list(backend.sampler.generators) == ["a", "c"]


def test_cli_help_and_args(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--scheduler" in capsys.readouterr().out
    args = build_parser().parse_args(
        ["--scheduler", "tcp://h:1", "--worker-id", "w9", "--sim", PROFILE, "--num-blocks", "8"]
    )
    assert (args.sim, args.model, args.num_blocks, args.block_size) == (PROFILE, None, 8, 16)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--scheduler", "tcp://h:1", "--model", "d", "--sim", PROFILE])


def test_cli_unknown_profile_exits_cleanly():
    assert main(["--scheduler", "tcp://127.0.0.1:1", "--sim", "no-such/profile"]) == 2


def test_cli_model_backend_profiles_at_start(model_dir, tmp_path):
    """Start-up profiling sets the announced budget and writes timings the cost model fits."""
    from ecoserve_scheduler.sim.cost_model import load_timings
    from ecoserve_worker.profiling import token_budget

    out = tmp_path / "timings.jsonl"
    base = ["--scheduler", "tcp://h:1", "--model", str(model_dir), "--num-blocks", "80"]
    info = make_backend(build_parser().parse_args([*base, "--profile-out", str(out)])).info()
    assert (info["num_blocks"], info["block_size"], info["device"]) == (80, 16, "cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["kind"] for r in rows} == {"prefill", "decode", "mixed"}
    target = DEFAULT_STEP_TARGET_MS / 1e3
    assert info["token_budget"] == token_budget(rows, fraction=0.9, step=16, step_target_s=target)
    assert len(load_timings(out)) == len(rows)

    given = make_backend(build_parser().parse_args([*base, "--token-budget", "96"])).info()
    assert given["token_budget"] == 96
    skipped = make_backend(build_parser().parse_args([*base, "--no-profile"])).info()
    assert skipped["token_budget"] == DEFAULT_TOKEN_BUDGET
