"""The model-directory convention on fake directories: a conversion counts only when its
manifest is written and every file still matches it; ensure_model converts into a temporary
directory and renames it into place, so a failed conversion leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ecoserve_common import models
from ecoserve_common.models import (
    DEFAULT_MODEL,
    MANIFEST,
    ModelMissing,
    cache_dir_for,
    resolve,
    served_name,
    verify,
    write_manifest,
)
from ecoserve_worker import models as converter


def fake_checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "model.safetensors").write_bytes(b"\0" * 64)
    (directory / "tokenizer.json").write_text("{}")
    return directory


def test_whole_conversion_resolves(tmp_path):
    target = fake_checkpoint(cache_dir_for(DEFAULT_MODEL, tmp_path))
    write_manifest(target, source="test")
    assert resolve(None, tmp_path) == target
    manifest = verify(target)
    assert manifest["source"] == "test"
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}


def test_half_written_conversion_is_refused(tmp_path):
    """Files but no manifest (the converter died before writing it): not converted."""
    fake_checkpoint(cache_dir_for(DEFAULT_MODEL, tmp_path))
    with pytest.raises(ModelMissing, match="not converted yet"):
        resolve(DEFAULT_MODEL, tmp_path)


@pytest.mark.parametrize("change", ["edit", "truncate", "delete"])
def test_changed_file_is_refused(tmp_path, change):
    target = fake_checkpoint(cache_dir_for(DEFAULT_MODEL, tmp_path))
    write_manifest(target, source="test")
    weights = target / "model.safetensors"
    if change == "edit":  # same size, other bytes: only the digest tells
        weights.write_bytes(b"\1" * 64)
    elif change == "truncate":
        weights.write_bytes(b"\0" * 10)
    else:
        weights.unlink()
    with pytest.raises(ModelMissing, match="model.safetensors is missing or changed"):
        resolve(DEFAULT_MODEL, tmp_path)


def test_plain_directory_and_names(tmp_path):
    plain = fake_checkpoint(tmp_path / "my-model")
    assert resolve(str(plain)) == plain  # no manifest needed for a directory given by path
    with pytest.raises(ModelMissing, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelMissing, match="known name"):
        resolve("no-such-model", tmp_path)
    assert cache_dir_for("/x/SmolLM2-135M.Q4_1.gguf", tmp_path) == tmp_path / "smollm2-135m.q4_1"
    assert served_name(DEFAULT_MODEL) == DEFAULT_MODEL
    assert served_name(str(plain) + "/") == "my-model"


def test_models_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ECOSERVE_MODELS_DIR", str(tmp_path))
    assert models.models_dir() == tmp_path
    assert resolve.__module__ == "ecoserve_common.models"


def test_ensure_model_converts_once_and_atomically(tmp_path, monkeypatch):
    """A failed conversion leaves no target; a good one lands whole; a whole one is reused."""
    calls = []

    def fake_gguf(spec, scratch):
        return tmp_path / "m.gguf", f"fake:{spec}"

    def failing(gguf, out):
        calls.append("fail")
        fake_checkpoint(out)
        raise RuntimeError("disk full")

    def working(gguf, out):
        calls.append("ok")
        fake_checkpoint(out)

    root = tmp_path / "models"
    monkeypatch.setattr(converter, "_gguf_for", fake_gguf)
    monkeypatch.setattr(converter, "convert_gguf", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        converter.ensure_model(DEFAULT_MODEL, root)
    target = cache_dir_for(DEFAULT_MODEL, root)
    assert not target.exists()
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []

    monkeypatch.setattr(converter, "convert_gguf", working)
    assert converter.ensure_model(DEFAULT_MODEL, root) == target
    assert verify(target)["source"] == f"fake:{DEFAULT_MODEL}"
    assert converter.ensure_model(DEFAULT_MODEL, root) == target  # whole: not converted again
    assert calls == ["fail", "ok"]

    (target / "model.safetensors").write_bytes(b"changed")  # changed: converted again
    assert converter.ensure_model(DEFAULT_MODEL, root) == target
    assert calls == ["fail", "ok", "ok"]
    assert (target / MANIFEST).is_file()


def test_ensure_model_never_converts_a_directory(tmp_path):
    with pytest.raises(ModelMissing, match="no config.json"):
        converter.ensure_model(str(tmp_path))
    with pytest.raises(ModelMissing, match="no such .gguf"):
        converter.ensure_model(str(tmp_path / "absent.gguf"), tmp_path / "models")
