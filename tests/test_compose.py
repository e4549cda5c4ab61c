"""The compose stack, checked without a Docker engine: it parses, each service's command is
accepted by that service's own CLI, environment variables are real settings, and the
addresses and ports of the services agree with each other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from ecoserve_predictor.__main__ import build_parser as predictor_parser  # noqa: E402
from ecoserve_scheduler.live.settings import ENV_PREFIX, SchedulerSettings  # noqa: E402
from ecoserve_worker.__main__ import build_parser as worker_parser  # noqa: E402

COMPOSE = Path(__file__).resolve().parents[1] / "compose"
ENV = {"ECOSERVE_WORKER_AUTH_TOKEN": "t", "ECOSERVE_MODEL_DIR": "/m", "ECOSERVE_API_KEY": ""}


def expand(value):
    """Compose's ${VAR:?msg} / ${VAR:-default} / ${VAR} with ENV (what `docker compose config`
    would do)."""
    if isinstance(value, str):

        def sub(m):
            name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
            if name in ENV and (ENV[name] or op != ":-"):
                return ENV[name]
            if op == ":?":
                raise AssertionError(f"{name} required: {arg}")
            return arg

        return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", sub, value)
    if isinstance(value, list):
        return [expand(v) for v in value]
    if isinstance(value, dict):
        return {k: expand(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def services():
    return expand(yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"])


def test_every_service_is_defined_and_healthchecked_where_it_has_a_port(services):
    assert {"postgres", "predictor", "scheduler", "worker", "worker-gpu", "predictor-gpu"} <= set(
        services
    )
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
            assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health"
    for name in ("postgres", "predictor", "predictor-gpu", "scheduler"):
        assert services[name]["healthcheck"]["test"]


def test_commands_parse_with_each_services_own_cli(services):
    for name in ("worker", "worker-gpu"):
        cmd = services[name]["command"]
        assert cmd[0] == "ecoserve-worker"
        args = worker_parser().parse_args(cmd[1:])
        assert args.model == "/models/model" and args.auth_token == "t"
        assert args.device == ("cuda" if name == "worker-gpu" else "cpu")
    for name in ("predictor", "predictor-gpu"):
        cmd = services[name]["command"]
        assert cmd[0] == "ecoserve-predictor"
        assert predictor_parser().parse_args(cmd[1:]).command == "serve"
    assert services["scheduler"]["command"] == ["ecoserve", "serve"]


def test_scheduler_environment_is_its_settings_and_addresses_agree(services):
    env = {k: str(v) for k, v in services["scheduler"]["environment"].items()}
    fields = {f.name for f in SchedulerSettings.__dataclass_fields__.values()}
    for key in env:
        assert key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in fields, key
    s = SchedulerSettings.load([], environ=env)
    worker_port = s.worker_bind.rsplit(":", 1)[1]
    assert worker_port in services["scheduler"]["expose"]
    for name in ("worker", "worker-gpu"):
        args = worker_parser().parse_args(services[name]["command"][1:])
        assert args.scheduler == f"tcp://scheduler:{worker_port}"
        assert args.auth_token == s.worker_auth_token
    published = {p.split(":")[1] for p in services["scheduler"]["ports"]}
    assert {s.grpc_address.rsplit(":", 1)[1], s.http_address.rsplit(":", 1)[1]} <= published
    host, port = s.predictor.rsplit(":", 1)
    assert host == "predictor" and port in services["predictor"]["expose"]
    pred = predictor_parser().parse_args(services["predictor"]["command"][1:])
    assert pred.address.endswith(f":{port}")
    db = services["postgres"]["environment"]
    assert s.db_url == (
        f"postgresql+psycopg://{db['POSTGRES_USER']}:{db['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{db['POSTGRES_DB']}"
    )
    assert services["scheduler"]["volumes"][0].endswith(":" + s.model + ":ro")


def test_dockerfiles_pin_torch_and_exist(services):
    for name in ("scheduler", "worker-gpu"):
        path = COMPOSE.parent / services[name]["build"]["dockerfile"]
        text = path.read_text()
        assert "torch==2.13.0" in text and "pip" in text
    assert "download.pytorch.org/whl/cpu" in (COMPOSE / "Dockerfile").read_text()
