"""`kustomize build`, in Python, for the features deploy/kubernetes/ uses, so the tests render
every overlay without a kustomize or kubectl binary (none is downloaded at test time).

Supported, as kustomize does them: `resources` (files, and directories built recursively),
`components` (kind: Component: its resources added, then its own patches applied to everything
accumulated so far), `patches` given by `path` (a strategic-merge patch targeting the resource
of its kind and name), and `namespace`. A strategic merge here: maps merge key by key, `null`
deletes a key, the lists Kubernetes merges by a key (containers and init containers, env,
volumes and ports by name or port, volume mounts by mount path) merge item by item (the
patch's items first, as Kubernetes orders them), every other list is replaced. Anything else
in a kustomization (images, generators, JSON patches, `$patch` directives, ...) raises instead
of being ignored: a renderer that silently skipped a feature would validate manifests
kustomize never produces.
`tests/test_kubernetes.py` compares this with `kubectl kustomize` wherever kubectl exists.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "namespace"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
CLUSTER_SCOPED |= {"StorageClass", "CustomResourceDefinition", "PriorityClass"}
# Kubernetes' patch merge keys for the lists these manifests patch.
MERGE_KEYS = {
    "containers": ("name",),
    "initContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "ports": ("containerPort", "port"),  # a container's ports, a Service's ports
    "imagePullSecrets": ("name",),
}


def load_docs(path: Path) -> list[dict]:
    """The non-empty YAML documents of one file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(directory: Path) -> dict:
    (k,) = load_docs(directory / "kustomization.yaml")
    unknown = set(k) - KNOWN_KEYS
    if unknown:
        raise NotImplementedError(f"{directory}: kustomization fields {sorted(unknown)}")
    return k


def build(directory: Path) -> list[dict]:
    """The rendered resources of a kustomization directory, in kustomize's input order."""
    k = kustomization(directory)
    if k.get("kind", "Kustomization") != "Kustomization":
        raise ValueError(f"{directory}: a {k['kind']} is not built on its own")
    resources = accumulate(directory, k, [])
    return transform(directory, k, resources)


def accumulate(directory: Path, k: dict, resources: list[dict]) -> list[dict]:
    """`k`'s resources added to `resources`, then its components applied."""
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        resources = resources + (build(path) if path.is_dir() else load_docs(path))
    for entry in k.get("components", []):
        path = (directory / entry).resolve()
        component = kustomization(path)
        if component.get("kind") != "Component":
            raise ValueError(f"{path}: listed as a component but is a {component.get('kind')}")
        resources = transform(path, component, accumulate(path, component, resources))
    return resources


def transform(directory: Path, k: dict, resources: list[dict]) -> list[dict]:
    resources = copy.deepcopy(resources)
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise NotImplementedError(f"{directory}: patch {patch} (only `path` patches)")
        for doc in load_docs(directory / patch["path"]):
            merge(target(resources, doc), doc)
    if "namespace" in k:
        for r in resources:
            if r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["namespace"] = k["namespace"]
    return resources


def target(resources: list[dict], patch: dict) -> dict:
    """The one resource of the patch's kind and name."""
    kind, name = patch["kind"], patch["metadata"]["name"]
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    if len(found) != 1:
        raise ValueError(f"patch for {kind}/{name} matches {len(found)} resources")
    return found[0]


def merge(base: dict, patch: dict) -> None:
    """Strategic-merge `patch` into `base` (in place)."""
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise NotImplementedError(f"patch directive {key}")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(base.get(key), list):
            merge_list(base[key], value, MERGE_KEYS[key])
        else:
            base[key] = copy.deepcopy(value)


def merge_list(base: list, patch: list, keys: tuple[str, ...]) -> None:
    """Merge by key, in Kubernetes' order: the patch's items first (in its order, each merged
    into the base item of the same key), then the base items it did not name."""
    merged, named = [], set()
    for item in patch:
        key = next(k for k in keys if k in item)
        same = [b for b in base if b.get(key) == item[key]]
        if same:
            merge(same[0], item)
            merged.append(same[0])
            named.add(id(same[0]))
        else:
            merged.append(copy.deepcopy(item))
    base[:] = merged + [b for b in base if id(b) not in named]
