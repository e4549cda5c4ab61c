"""deploy/kubernetes/, checked without a cluster (issue 21): every overlay renders (the Python
kustomize of kube_render.py, equal to `kubectl kustomize` wherever kubectl exists), every object
validates against the Kubernetes schemas offline (kubernetes-validate ships them), and the
manifests agree with the services, as tests/test_compose.py checks the compose stack: each
container runs a command its image installs, commands and environment parse with each
service's own CLI and settings, addresses, ports, probes and Services line up, and every secret
comes from a Secret that make_secrets.py (or the database operator) makes, never a literal or
argv."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from kube_manifests import (  # noqa: E402
    GPU,
    KUBE,
    OVERLAYS,
    REPO,
    argv,
    compose_images,
    container,
    containers,
    cpu_cores,
    env_of,
    hostport,
    mount_of,
    mounted_secret,
    ms,
    one,
    port,
    rendered,
    scheduler,
    secrets_for,
    workloads,
)
from test_compose import IMAGES, project  # noqa: E402

from ecoserve_predictor.__main__ import build_parser as predictor_parser  # noqa: E402
from ecoserve_worker import health  # noqa: E402
from ecoserve_worker.__main__ import INSECURE_ENV, KEYS_ENV, TOKEN_ENV  # noqa: E402
from ecoserve_worker.__main__ import build_parser as worker_parser  # noqa: E402

WORKER_READS = {KEYS_ENV, TOKEN_ENV, INSECURE_ENV, "ECOSERVE_MODELS_DIR", "ECOSERVE_PROFILE_CACHE"}
WORKER_READS |= {"ECOSERVE_KERNELS", "TORCH_EXTENSIONS_DIR", "HOME"}
THIRD_PARTY_IMAGES = {"postgres:16"}
# Custom resources: no schema in kubernetes-validate; their fields are checked below.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("postgresql.cnpg.io/v1", "Cluster")}
SECRET_SETTINGS = {"ECOSERVE_API_KEY", "ECOSERVE_WORKER_AUTH_TOKEN", "ECOSERVE_DB_URL"}


# ---- rendering and schemas --------------------------------------------------------------------


def test_every_kustomization_is_rendered_and_every_manifest_is_used():
    dirs = {p.parent.relative_to(KUBE).as_posix() for p in KUBE.rglob("kustomization.yaml")}
    components = {d for d in dirs if d.startswith("components/")}
    assert dirs - components == set(OVERLAYS)
    used: set[Path] = set()
    for d in dirs:
        k = yaml.safe_load((KUBE / d / "kustomization.yaml").read_text())
        used |= {(KUBE / d / r).resolve() for r in k.get("resources", [])}
        used |= {(KUBE / d / p["path"]).resolve() for p in k.get("patches", [])}
        used |= {(KUBE / d / c).resolve() for c in k.get("components", [])}
    assert {(KUBE / c).resolve() for c in components} <= used, "a component no overlay uses"
    docs = {p.resolve() for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml"}
    values = KUBE / "components/autoscaling/prometheus-adapter-values.yaml"  # Helm values
    assert docs - used == {values.resolve()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate_against_the_kubernetes_schemas(overlay):
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate absent: pip install -r requirements-dev.txt",
    )
    versions = ("1.29.0", kv.utils.latest_version())  # the oldest we support, the newest known
    objs = rendered(overlay)
    assert objs
    for obj in objs:
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue
        for version in versions:  # strict: an unknown or misspelt field fails too
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                pytest.fail(
                    f"{overlay} {obj['kind']}/{obj['metadata']['name']} on {version}: "
                    f"{where}: {e.message}"
                )
    assert {o["metadata"].get("namespace") for o in objs} == (
        {None} if overlay == "base" else {"ecoserve"}
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_python_render_equals_kubectl_kustomize(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl absent: only the Python render (kube_render.py) is checked")
    out = subprocess.run(
        [kubectl, "kustomize", str(KUBE / overlay)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out.stdout) if o}
    ours = {(o["kind"], o["metadata"]["name"]): o for o in rendered(overlay)}
    assert ours == theirs


# ---- images and commands ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_container_runs_a_command_its_image_installs(overlay):
    images = compose_images()
    for w in workloads(rendered(overlay)):
        for c in containers(w["spec"]["template"]["spec"]):
            if c["image"] in THIRD_PARTY_IMAGES:
                continue
            dockerfile = images[c["image"]]  # KeyError: an image no Dockerfile builds
            dists = IMAGES[dockerfile]
            cmd = c["command"]
            if cmd[:2] == ["python3", "-m"]:  # python3: the CUDA image has no `python`
                assert any((REPO / d / cmd[2].split(".")[0]).is_dir() for d in dists), c["name"]
            else:
                scripts = {s for d in dists for s in project(d).get("scripts", {})}
                assert cmd[0] in scripts, f"{c['name']}: {cmd[0]} not in {dockerfile}"
            assert c["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_is_named_once_and_fetched_where_it_is_read(overlay):
    objs = rendered(overlay)
    config = one(objs, "ConfigMap", "ecoserve-config")["data"]
    for kind, name in (("StatefulSet", "ecoserve-scheduler"), ("Deployment", "ecoserve-worker")):
        pod = one(objs, kind, name)["spec"]["template"]["spec"]
        (fetch,) = pod["initContainers"]
        assert argv(objs, fetch)[:5] == [
            "python3",
            "-m",
            "ecoserve_worker.models",
            "fetch",
            config["ECOSERVE_MODEL"],
        ]
        main = pod["containers"][0]
        volume, rw = mount_of(pod, fetch, config["ECOSERVE_MODELS_DIR"])
        assert "emptyDir" in volume and not rw.get("readOnly")  # only the fetch writes it
        assert mount_of(pod, main, config["ECOSERVE_MODELS_DIR"])[1]["readOnly"] is True
        assert env_of(objs, main)["ECOSERVE_MODELS_DIR"] == config["ECOSERVE_MODELS_DIR"]
    _, worker = container(objs, "Deployment", "ecoserve-worker", "worker")
    assert worker_parser().parse_args(argv(objs, worker)[1:]).model == config["ECOSERVE_MODEL"]


# ---- the scheduler ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scheduler_settings_ports_probes_and_services_agree(overlay, tmp_path):
    objs = rendered(overlay)
    pod, c, s = scheduler(overlay, tmp_path)
    assert one(objs, "StatefulSet", "ecoserve-scheduler")["spec"]["replicas"] == 1
    assert hostport(s.grpc_address)[1] == port(c, "grpc")
    assert hostport(s.http_address)[1] == port(c, "http")
    assert hostport(s.worker_bind)[1] == port(c, "workers")
    for address in (s.grpc_address, s.http_address, s.worker_bind):
        assert hostport(address)[0] == "0.0.0.0"  # reachable through the pod's IP
    # secrets: never literal, each from the Secret make_secrets.py writes it to
    assert s.db_url.startswith("from-secret-") and s.api_key.startswith("from-secret-ecoserve-auth")
    assert s.worker_auth_token == "from-secret-ecoserve-auth-worker-auth-token"
    keys = mount_of(pod, c, s.worker_keys_dir)[0]["secret"]
    assert keys["secretName"] == ms.CURVE_SCHEDULER and keys["defaultMode"] & 0o077 == 0
    paths = {i["path"]: i["key"] for i in keys["items"]}
    assert paths["server.key_secret"] == "server.key_secret"  # ServerKeys.load's layout
    assert [p for p in paths if p.startswith("workers/") and p.endswith(".key")]
    # the predictor, by its Service
    host, p = hostport(s.predictor)
    svc = one(objs, "Service", host)
    (sp,) = [x for x in svc["spec"]["ports"] if x["port"] == p]
    _, pred = container(objs, "Deployment", "ecoserve-predictor", "predictor")
    served = predictor_parser().parse_args(argv(objs, pred)[1:])
    assert hostport(served.address)[1] == port(pred, sp["targetPort"])
    # probes: readiness is /health (engine up, a worker registered), liveness /livez
    from ecoserve_scheduler.live.http_api import create_app

    routes = set(create_app(frontend=None, model_id="m").openapi()["paths"])
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/livez", "port": "http"}
    assert {"/health", "/livez", "/metrics"} <= routes
    template = one(objs, "StatefulSet", "ecoserve-scheduler")["spec"]["template"]
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics"}
    assert template["metadata"]["annotations"] == {**scrape, "prometheus.io/port": "8000"}
    assert port(c, "http") == 8000


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_pods_and_name_their_ports(overlay):
    objs = rendered(overlay)
    pods = {w["metadata"]["name"]: w["spec"]["template"] for w in workloads(objs)}
    for svc in [o for o in objs if o["kind"] == "Service"]:
        chosen = [
            (n, t)
            for n, t in pods.items()
            if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()
        ]
        assert len(chosen) == 1, svc["metadata"]["name"]
        (c,) = chosen[0][1]["spec"]["containers"]
        for p in svc["spec"]["ports"]:
            port(c, p["targetPort"])  # a named port the pod has
    for w in workloads(objs):
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()
    plane = one(objs, "Service", "ecoserve-scheduler-workers")
    assert plane["spec"]["clusterIP"] == "None" and plane["spec"]["publishNotReadyAddresses"]
    assert (
        one(objs, "StatefulSet", "ecoserve-scheduler")["spec"]["serviceName"]
        == "ecoserve-scheduler-workers"
    )
    policy = one(objs, "NetworkPolicy", "ecoserve-scheduler")["spec"]
    workers_only, open_ports = policy["ingress"]
    assert [p["port"] for p in workers_only["ports"]] == ["workers"]
    assert "from" not in open_ports and {p["port"] for p in open_ports["ports"]} == {"grpc", "http"}


# ---- the workers ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_command_environment_and_probes_agree_with_the_scheduler(overlay, tmp_path):
    objs = rendered(overlay)
    _, sched, s = scheduler(overlay, tmp_path)
    deployment = one(objs, "Deployment", "ecoserve-worker")
    pod, c = container(objs, "Deployment", "ecoserve-worker", "worker")
    env, args = env_of(objs, c), argv(objs, c)
    assert args[0] == "ecoserve-worker" and "$(" not in " ".join(args)  # every variable set
    a = worker_parser().parse_args(args[1:])
    # it dials the scheduler's worker plane: the headless Service's port, the scheduler's bind
    host, p = hostport(a.scheduler)
    (plane_port,) = one(objs, "Service", host)["spec"]["ports"]
    assert a.scheduler.startswith("tcp://") and p == plane_port["port"]
    assert port(sched, plane_port["targetPort"]) == hostport(s.worker_bind)[1]
    assert (a.device, a.dtype) == (("cuda", "bfloat16") if overlay in GPU else ("cpu", "float32"))
    assert a.num_blocks > 0 and a.model == s.model
    requests = c["resources"]["requests"]
    assert 1 <= a.threads <= cpu_cores(requests["cpu"])  # its share of the cores it asked for
    # secrets: the same shared secret as the scheduler's, from a file; CURVE keys from a Secret
    assert "--auth-token" not in args and a.auth_token_file
    assert mounted_secret(pod, c, a.auth_token_file) == (ms.AUTH, "worker-auth-token")
    keys = mount_of(pod, c, env[KEYS_ENV])[0]["secret"]
    assert keys["secretName"] == ms.CURVE_WORKER and keys["defaultMode"] & 0o077 == 0
    assert secrets_for(overlay)[ms.CURVE_WORKER] == {"server.key", "worker.key_secret"}
    # every variable does something: the worker reads it, or its command line uses it
    used = {m for arg in c["command"] + c["args"] for m in re.findall(r"\$\((\w+)\)", arg)}
    assert set(env) <= WORKER_READS | used, set(env) - WORKER_READS - used
    # probes: its health endpoint, on the port the pod names
    assert hostport(a.health_address) == ("0.0.0.0", port(c, "health"))
    assert c["readinessProbe"]["httpGet"] == {"path": health.READY, "port": "health"}
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": health.LIVE, "port": "health"}
    # leaving: SIGTERM drains, the grace period outlasts it, updates surge before they drain
    spec = deployment["spec"]
    assert 0 < a.drain_timeout_s < pod["terminationGracePeriodSeconds"]
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pdb = one(objs, "PodDisruptionBudget", "ecoserve-worker")["spec"]
    assert pdb["selector"] == spec["selector"] and pdb["maxUnavailable"] == 1
    gpus = [c["resources"][k].get("nvidia.com/gpu") for k in ("requests", "limits")]
    assert gpus == (["1", "1"] if overlay in GPU else [None, None])
    if overlay in GPU:
        images = compose_images()
        assert all(
            "nvidia/cuda" in (REPO / images[x["image"]]).read_text() for x in containers(pod)
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_bounded_probed_and_private(overlay):
    for w in workloads(rendered(overlay)):
        pod = w["spec"]["template"]["spec"]
        name = w["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False, name  # none talks to the API
        assert pod["enableServiceLinks"] is False, name  # no stray *_PORT variables
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {
                "drop": ["ALL"]
            }
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), (name, c["name"])
            assert "memory" in c["resources"]["limits"], (name, c["name"])
            for e in c.get("env", []):  # a secret setting is never a literal value
                assert not (e["name"] in SECRET_SETTINGS | {"POSTGRES_PASSWORD"} and "value" in e)
            for arg in c.get("command", []) + c.get("args", []):
                assert not re.search(r"--(api-key|auth-token|password)(=|$)", arg), arg
            for v in pod.get("volumes", []):  # every Secret a pod reads is one we make
                if "secret" in v:
                    keys = secrets_for(overlay)[v["secret"]["secretName"]]
                    assert {i["key"] for i in v["secret"].get("items", [])} <= keys
                    assert v["secret"]["defaultMode"] & 0o077 == 0  # owner-only, as curve asks
        for c in pod["containers"]:
            assert {"livenessProbe", "readinessProbe"} <= set(c), (name, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_predictor_is_a_deployment_probed_over_grpc_health(overlay):
    objs = rendered(overlay)
    predictor = one(objs, "Deployment", "ecoserve-predictor")
    assert predictor["spec"]["replicas"] >= 1
    _, c = container(objs, "Deployment", "ecoserve-predictor", "predictor")
    a = predictor_parser().parse_args(argv(objs, c)[1:])
    assert a.command == "serve" and hostport(a.address) == ("0.0.0.0", port(c, "grpc"))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"] == {"port": port(c, "grpc")}
