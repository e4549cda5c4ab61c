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


def test_the_api_key_is_a_secret_from_the_environment_or_a_file(tmp_path):
    with pytest.raises(SystemExit):  # a flag's value shows in ps: refused
        SchedulerSettings.load(["--api-key", "sesame"])
    env = {"ECOSERVE_API_KEY": "from-env"}
    assert SchedulerSettings.load([], environ=env).api_key == "from-env"
    key = tmp_path / "api.key"
    key.write_text("from-file\n")
    assert SchedulerSettings.load(["--api-key-file", str(key)], environ={}).api_key == "from-file"
