"""What the Kubernetes tests read the rendered manifests with (tests/test_kubernetes*.py):
every overlay rendered once (kube_render.py), the Secrets make_secrets.py makes for it, and the
lookups: a workload's containers, a container's environment and command line as Kubernetes
builds them ($(VAR) expanded), which Secret a mounted file comes from, named ports."""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

import yaml
from kube_render import build

from ecoserve_scheduler.live.settings import ENV_PREFIX, SchedulerSettings

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "deploy" / "kubernetes"
OVERLAYS = ("base", "overlays/cpu", "overlays/cuda", "overlays/dev", "overlays/production")
GPU = {"overlays/cuda", "overlays/production"}


def load_make_secrets():
    spec = importlib.util.spec_from_file_location("make_secrets", KUBE / "make_secrets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ms = load_make_secrets()


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(build(KUBE / overlay))


@cache
def secrets_for(overlay: str) -> dict[str, set[str]]:
    """Secret name -> keys, as make_secrets.py makes them for this overlay (plus, with
    CloudNativePG, the Secret its operator makes for the cluster)."""
    kw = {"dev_postgres": True} if overlay == "overlays/dev" else {}
    if overlay in ("base", "overlays/cpu", "overlays/cuda"):
        kw = {"db_url": "postgresql+psycopg://u:p@db:5432/ecoserve"}
    out = {s["metadata"]["name"]: set(s["stringData"]) for s in ms.make_secrets(**kw)}
    for obj in rendered(overlay):
        if obj["kind"] == "Cluster":  # CloudNativePG: <cluster>-app holds the URL as `uri`
            out[obj["metadata"]["name"] + "-app"] = {"uri", "username", "password", "host"}
    return out


def one(objs, kind: str, name: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def workloads(objs):
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def container(objs, kind: str, name: str, cname: str) -> tuple[dict, dict]:
    pod = one(objs, kind, name)["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == cname]
    return pod, c


def env_of(objs, c: dict) -> dict[str, object]:
    """The container's environment as Kubernetes builds it: envFrom ConfigMaps, then env;
    ("secret", name, key) for a value from a Secret."""
    env: dict[str, object] = {}
    for src in c.get("envFrom", []):
        env.update(one(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = ("secret", ref["name"], ref["key"])
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = one(objs, "ConfigMap", ref["name"])["data"][ref["key"]]
    return env


def expand(text: str, env: dict) -> str:
    """Kubernetes' $(VAR) in command, args and env values (left as is when VAR is unset)."""
    return re.sub(r"\$\((\w+)\)", lambda m: str(env.get(m.group(1), m.group(0))), text)


def argv(objs, c: dict) -> list[str]:
    env = env_of(objs, c)
    return [expand(a, env) for a in c.get("command", []) + c.get("args", [])]


def mounted_secret(pod: dict, c: dict, path: str) -> tuple[str, str] | None:
    """(Secret, key) of the file at `path` in the container, or None."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        root = m["mountPath"].rstrip("/") + "/"
        secret = volumes[m["name"]].get("secret")
        if secret and path.startswith(root):
            rel = path[len(root) :]
            items = secret.get("items") or []
            keys = {i["path"]: i["key"] for i in items} if items else None
            return secret["secretName"], (keys.get(rel) if keys is not None else rel)
    return None


def mount_of(pod: dict, c: dict, path: str) -> tuple[dict, dict]:
    """(volume, mount) mounted at exactly `path`."""
    (m,) = [m for m in c.get("volumeMounts", []) if m["mountPath"] == path]
    (v,) = [v for v in pod["volumes"] if v["name"] == m["name"]]
    return v, m


def port(c: dict, name: str) -> int:
    (p,) = [p["containerPort"] for p in c.get("ports", []) if p["name"] == name]
    return p


def hostport(address: str) -> tuple[str, int]:
    host, _, p = address.removeprefix("tcp://").rpartition(":")
    return host, int(p)


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def compose_images() -> dict[str, str]:
    """Image tag -> its Dockerfile, as the compose stack builds them."""
    services = yaml.safe_load((REPO / "compose/docker-compose.yml").read_text())["services"]
    out = {}
    for svc in services.values():
        if "build" in svc:
            out[svc["image"]] = f"compose/{svc['build']['dockerfile'].split('/')[-1]}"
    for anchor in yaml.safe_load((REPO / "compose/docker-compose.yml").read_text()).values():
        if isinstance(anchor, dict) and "build" in anchor and "image" in anchor:
            out[anchor["image"]] = f"compose/{anchor['build']['dockerfile'].split('/')[-1]}"
    return out


def scheduler(overlay: str, tmp_path: Path) -> tuple[dict, dict, SchedulerSettings]:
    """The scheduler's pod, container and settings, loaded from its environment as `serve`
    loads them (each *_FILE pointed at a stand-in file once checked to be a mounted Secret)."""
    objs = rendered(overlay)
    pod, c = container(objs, "StatefulSet", "ecoserve-scheduler", "scheduler")
    assert argv(objs, c) == ["ecoserve-scheduler", "serve"]  # every setting from the env
    environ = {}
    for name, value in env_of(objs, c).items():
        if isinstance(value, tuple):  # from a Secret
            _, secret, key = value
            assert key in secrets_for(overlay)[secret], (name, secret, key)
            value = f"from-secret-{secret}-{key}"
        elif name.endswith("_FILE"):
            secret, key = mounted_secret(pod, c, value)
            assert key in secrets_for(overlay)[secret], (name, secret, key)
            stand_in = tmp_path / name
            stand_in.write_text(f"from-secret-{secret}-{key}")
            value = str(stand_in)
        environ[name] = value
    fields = set(SchedulerSettings.__dataclass_fields__)
    for name in environ:  # every variable is a setting (or the HOME-like few it never sets)
        assert name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX) :].lower() in fields, name
    return pod, c, SchedulerSettings.load([], environ=environ)
