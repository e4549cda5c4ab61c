"""Scheduler settings: a flag beats the environment, which beats the default."""

from __future__ import annotations

import pytest

from ecoserve_scheduler.live.settings import SchedulerSettings


def test_flag_beats_env_beats_default():
    env = {"ECOSERVE_MODEL": "/m", "ECOSERVE_POLICY": "vllm", "ECOSERVE_MAX_PENDING": "7"}
    s = SchedulerSettings.load(["--policy", "sjf"], environ=env)
    assert (s.model, s.policy, s.max_pending) == ("/m", "sjf", 7)
    assert s.grpc_address == SchedulerSettings.grpc_address  # default kept
    assert SchedulerSettings.load(["--model", "/x"], environ={}).worker_timeout_s == 2.0


def test_model_defaults_to_smollm2_and_may_not_be_empty():
    assert SchedulerSettings.load([], environ={}).model == "smollm2-135m-instruct"
    with pytest.raises(SystemExit, match="--model"):
        SchedulerSettings.load([], environ={"ECOSERVE_MODEL": ""})
