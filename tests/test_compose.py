"""The compose stack, checked without a Docker engine: it parses, each service's command is
accepted by that service's own CLI, environment variables are real settings, the addresses and
ports of the services agree with each other, and each service's image installs only its own
distribution(s) (with torch pinned, from the CPU index on CPU, where one of them needs it)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from ecoserve_predictor.__main__ import build_parser as predictor_parser  # noqa: E402
from ecoserve_scheduler.cli import build_parser as scheduler_parser  # noqa: E402
from ecoserve_scheduler.live.settings import ENV_PREFIX, SchedulerSettings  # noqa: E402
from ecoserve_worker.__main__ import build_parser as worker_parser  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose"
ENV = {"ECOSERVE_WORKER_AUTH_TOKEN": "t", "ECOSERVE_API_KEY": ""}

# What each image may install: the contract plus the service's own distribution(s), by path.
IMAGES = {
    "compose/Dockerfile.scheduler": {"services/common", "services/scheduler"},
    "compose/Dockerfile.worker": {"services/common", "services/worker"},
    "compose/Dockerfile.predictor": {"services/common", "services/predictor"},
    "compose/Dockerfile.gpu": {"services/common", "services/worker", "services/predictor"},
}
DIST_DIRS = ("services/common", "services/scheduler", "services/worker", "services/predictor")
DIST_DIRS += ("sdk", "stack")


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


def project(path: str) -> dict:
    return tomllib.loads((REPO / path / "pyproject.toml").read_text())["project"]


def req_name(requirement: str) -> str:
    """The normalised distribution name of a requirement string ("psycopg[binary]>=3" ->
    "psycopg")."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: str) -> dict[str, str]:
    """name -> requirement of a distribution's (non-extra) dependencies."""
    return {req_name(r): r.split(";")[0].replace(" ", "") for r in project(path)["dependencies"]}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pip_installs(dockerfile: Path) -> list[tuple[list[str], dict[str, str]]]:
    """Every `pip install` of the RUN lines, in order: (what it installs, its options)."""
    found = []
    for word, args in instructions(dockerfile):
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            tokens = shlex.split(command)
            if tokens[:2] not in (["pip", "install"], ["pip3", "install"]):
                continue
            targets, options, it = [], {}, iter(tokens[2:])
            for tok in it:
                if tok in ("--index-url", "-i", "--extra-index-url", "-r", "-c", "--constraint"):
                    options[tok] = next(it)
                elif tok.startswith("-"):
                    options[tok] = ""
                else:
                    targets.append(tok)
            found.append((targets, options))
    return found


def local_paths(targets: list[str]) -> set[str]:
    return {t.removeprefix("./").rstrip("/") for t in targets if t.startswith(("./", "services/"))}


def test_every_service_is_defined_and_healthchecked_where_it_has_a_port(services):
    assert {"model", "postgres", "predictor", "scheduler", "worker", "worker-gpu"} <= set(services)
    assert "predictor-gpu" in services
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_completed_successfully":  # a one-shot job
                assert "ports" not in services[dep] and "healthcheck" not in services[dep]
            else:
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health"
    for name in ("postgres", "predictor", "predictor-gpu", "scheduler"):
        assert services[name]["healthcheck"]["test"]


def test_commands_parse_with_each_services_own_cli(services):
    for name in ("worker", "worker-gpu"):
        cmd = services[name]["command"]
        assert cmd[0] == "ecoserve-worker"
        args = worker_parser().parse_args(cmd[1:])
        assert args.model == "smollm2-135m-instruct" and "--auth-token" not in cmd  # no secret
        assert services[name]["environment"]["ECOSERVE_WORKER_AUTH_TOKEN"] == "t"
        assert args.device == ("cuda" if name == "worker-gpu" else "cpu")
        assert args.dtype == ("bfloat16" if name == "worker-gpu" else "float32")
    for name in ("predictor", "predictor-gpu"):
        cmd = services[name]["command"]
        assert cmd[0] == "ecoserve-predictor"
        assert predictor_parser().parse_args(cmd[1:]).command == "serve"
    cmd = services["scheduler"]["command"]
    assert cmd[:2] == ["ecoserve-scheduler", "serve"]
    assert scheduler_parser().parse_args(cmd[1:2]).cmd == "serve"
    env = {k: str(v) for k, v in services["scheduler"]["environment"].items()}
    SchedulerSettings.load(cmd[2:], environ=env)  # `serve`'s own flags (none: all from env)


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
        worker_env = services[name]["environment"]
        assert worker_env["ECOSERVE_WORKER_AUTH_TOKEN"] == s.worker_auth_token
        assert worker_env["ECOSERVE_WORKER_KEYS_DIR"] == s.worker_keys_dir  # one key directory
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
    # one model, one models directory: converted by the `model` job, read-only elsewhere
    fetch = services["model"]
    assert fetch["command"][:4] == ["python", "-m", "ecoserve_worker.models", "fetch"]
    assert fetch["command"][4] == s.model == "smollm2-135m-instruct"
    assert fetch["volumes"] == ["models:/models"] and s.models_dir == "/models"
    for name in ("scheduler", "worker", "worker-gpu"):
        assert services[name]["volumes"] == ["models:/models:ro", "keys:/keys:ro"], name
    keys = services["keys"]  # the one-shot job that makes the worker-plane keys
    assert keys["command"][:4] == ["python", "-m", "ecoserve_common.curve", "init"]
    assert keys["command"][4] == s.worker_keys_dir and keys["volumes"] == ["keys:/keys"]
    for name in ("worker", "worker-gpu"):
        assert services[name]["environment"]["ECOSERVE_MODELS_DIR"] == s.models_dir
    assert services["scheduler"]["depends_on"]["model"] == {
        "condition": "service_completed_successfully"
    }


def test_each_service_runs_a_command_its_own_image_installs(services):
    tags: dict[str, str] = {}
    for name, svc in services.items():
        if "build" not in svc:
            continue
        dockerfile = svc["build"]["dockerfile"]
        assert dockerfile in IMAGES, f"{name}: unknown Dockerfile {dockerfile}"
        assert (REPO / svc["build"]["context"].replace("..", ".")).resolve() == REPO
        assert tags.setdefault(dockerfile, svc["image"]) == svc["image"], "one tag per Dockerfile"
        scripts = {s for path in IMAGES[dockerfile] for s in project(path).get("scripts", {})}
        if svc["command"][:2] == ["python", "-m"]:  # a module of a distribution it installs
            package = svc["command"][2].split(".")[0]
            assert any((REPO / d / package).is_dir() for d in IMAGES[dockerfile]), name
            continue
        assert svc["command"][0] in scripts, f"{name}: {svc['command'][0]} not in {dockerfile}"
    assert len(set(tags.values())) == len(tags), "two Dockerfiles build the same tag"
    assert set(tags) == set(IMAGES), "every Dockerfile is used by a service"


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_each_dockerfile_installs_only_its_own_distributions(dockerfile):
    path = REPO / dockerfile
    installs = pip_installs(path)
    assert installs, f"{dockerfile} installs nothing"
    installed = set().union(*(local_paths(targets) for targets, _ in installs))
    assert installed == IMAGES[dockerfile]
    ours = {project(d)["name"]: d for d in DIST_DIRS}
    for targets, _ in installs:
        named = {req_name(t) for t in targets if not t.startswith(("./", "services/"))}
        assert not named & set(ours), f"{dockerfile} names a repo distribution by name: {named}"
    copied = {
        src.removeprefix("./").rstrip("/"): dst.removeprefix("./").rstrip("/")
        for word, args in instructions(path)
        if word == "COPY"
        for src, dst in [args.split()]
    }
    for d in installed:
        assert (REPO / d / "pyproject.toml").is_file(), f"{dockerfile}: no distribution at {d}"
        assert copied.get(d) == d, f"{dockerfile} installs ./{d} without `COPY {d} ./{d}`"
        for dep in pins(d):
            if dep in ours:  # an in-repo dependency (ecoserve-common) comes from its folder
                assert ours[dep] in installed, f"{dockerfile}: {d} needs {ours[dep]}"
    assert set(copied) <= installed, f"{dockerfile} copies what it does not install"


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfiles_pin_torch_where_torch_is_installed(dockerfile):
    path = REPO / dockerfile
    installs = pip_installs(path)
    needed = {pins(d)["torch"] for d in IMAGES[dockerfile] if "torch" in pins(d)}
    torch_at = [
        i for i, (targets, _) in enumerate(installs) if any(req_name(t) == "torch" for t in targets)
    ]
    if not needed:
        assert not torch_at and not [a for _, a in instructions(path) if "torch" in a]
        return
    (pin,) = needed  # every distribution in the image pins the same torch
    assert pin == "torch==2.13.0"
    assert len(torch_at) == 1, f"{dockerfile}: torch installed once, up front"
    targets, options = installs[torch_at[0]]
    assert pin in targets, f"{dockerfile} installs torch unpinned: {targets}"
    first_local = min(i for i, (t, _) in enumerate(installs) if local_paths(t))
    assert torch_at[0] < first_local, "torch before the distributions that need it"
    cuda = next(a for w, a in instructions(path) if w == "FROM").startswith("nvidia/cuda")
    if not cuda:  # a bare torch from PyPI is the multi-GB CUDA build
        assert options.get("--index-url") == "https://download.pytorch.org/whl/cpu"


def test_scheduler_image_has_no_torch_and_no_worker():
    for targets, _ in pip_installs(COMPOSE / "Dockerfile.scheduler"):
        line = " ".join(targets)
        assert "services/worker" not in line and "torch" not in line
        assert "transformers" not in line and "services/predictor" not in line


def test_gpu_image_serves_the_predictor_on_onnxruntime_gpu():
    names = [
        req_name(t) for targets, _ in pip_installs(COMPOSE / "Dockerfile.gpu") for t in targets
    ]
    assert "onnxruntime-gpu" in names
    assert "pip3 uninstall -y onnxruntime" in (COMPOSE / "Dockerfile.gpu").read_text()
