"""Train a candidate on prompt/length pairs, evaluate it, export the artifact.

An artifact directory holds everything serving needs and nothing torch-specific:
`model.onnx` (inputs ids [B, L] int64, mask [B, L] float32, feats [B, 3] float32; output
log_lengths [B, 2], the log response length at quantiles 0.5 and 0.9), `tokenizer.json`, and
`meta.json` (cut lengths, bucket edges, validation metrics, how it was trained) and
`train_prompts.sha256` (hashes of the normalised prompts it was fit on: prompt_hashes.py).
"""

from __future__ import annotations

import json
import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecoserve_common.buckets import DEFAULT_EDGES

from .data import Pair, dedup, split
from .features import Encoder, pad, train_tokenizer
from .metrics import evaluate
from .models import MODELS, pinball_loss
from .prompt_hashes import write_hashes

CALIB_PERCENT = 10  # of the training conversations, held out to calibrate the upper bound


def _batches(lengths: Sequence[int], size: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar cut length (little padding), in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(batches)
    return batches


def _tensors(cut, feats, idx):
    ids, mask = pad([cut[i] for i in idx])
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(feats[idx])


def fit(
    kind: str,
    encoder: Encoder,
    pairs: Sequence[Pair],
    epochs: int = 4,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], Any] = print,
) -> torch.nn.Module:
    """Train a MODELS[kind] with the pinball loss on log1p(response tokens)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = MODELS[kind](encoder.tokenizer.get_vocab_size(), encoder.max_len)
    cut, feats = encoder.tokenize([p.prompt for p in pairs])
    target = torch.tensor([np.log1p(p.response_tokens) for p in pairs], dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total = epochs * -(-len(pairs) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    model.train()
    for epoch in range(epochs):
        t0, losses = time.perf_counter(), []
        for idx in _batches([len(c) for c in cut], batch_size, rng):
            loss = pinball_loss(model(*_tensors(cut, feats, idx)), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        log(
            f"{kind} epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f} "
            f"({time.perf_counter() - t0:.0f}s)"
        )
    return model.eval()


@torch.inference_mode()
def predict_log(model, encoder: Encoder, texts: Sequence[str], batch_size: int = 256):
    """[N, 2] log lengths (q0.5, q0.9) from the torch model."""
    cut, feats = encoder.tokenize(texts)
    out = np.zeros((len(texts), 2), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(cut[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        out[idx] = model(*_tensors(cut, feats, idx)).numpy()
    return out


def export_onnx(model, path: str | Path, vocab_size: int, max_len: int) -> Path:
    """ONNX with dynamic batch and sequence axes (opset 17, TorchScript exporter)."""
    path = Path(path)
    ids = torch.randint(1, vocab_size, (2, min(8, max_len)))
    mask = torch.ones(ids.shape)
    feats = torch.zeros(2, 3)
    with warnings.catch_warnings():  # shape-dependent Python in forward: fine, axes are dynamic
        warnings.simplefilter("ignore")
        _export(model, (ids, mask, feats), path)
    return path


def _export(model, args, path: Path) -> None:
    torch.onnx.export(
        model,
        args,
        str(path),
        input_names=["ids", "mask", "feats"],
        output_names=["log_lengths"],
        dynamic_axes={
            "ids": {0: "batch", 1: "seq"},
            "mask": {0: "batch", 1: "seq"},
            "feats": {0: "batch"},
            "log_lengths": {0: "batch"},
        },
        opset_version=17,
        dynamo=False,
    )


def upper_shift(model, encoder: Encoder, calib: Sequence[Pair], q: float = 0.9) -> float:
    """How far to raise the model's log p90 so that a share `q` of held-out lengths falls
    under it (split-conformal calibration): a trained quantile head is overconfident on the
    prompts it fit, and the scheduler pads KV reservations with this bound."""
    if not calib:
        return 0.0
    logs = predict_log(model, encoder, [p.prompt for p in calib])
    gap = np.log1p([p.response_tokens for p in calib]) - logs[:, 1]
    return float(np.quantile(gap, q))


def train_artifact(
    out_dir: str | Path,
    train: Sequence[Pair],
    val: Sequence[Pair],
    kind: str = "encoder",
    vocab_size: int = 8192,
    epochs: int = 4,
    seed: int = 0,
    edges: Sequence[int] = DEFAULT_EDGES,
    source: str = "",
    log: Callable[[str], Any] = print,
    test_pairs: int = 0,
) -> dict[str, Any]:
    """Tokenizer + model trained on `train`, evaluated on `val`, written to `out_dir`.
    `test_pairs`: how many pairs the caller held out as a test split (recorded, not used)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Calibration prompts must be new to the fit too, or the p90 shift is set on prompts the
    # model has memorised and comes out too small for prompts it has not.
    fit_pairs, calib = dedup(split(train, CALIB_PERCENT, salt="calibration"))
    encoder = Encoder(train_tokenizer((p.prompt for p in fit_pairs), vocab_size))
    model = fit(kind, encoder, fit_pairs, epochs=epochs, seed=seed, log=log)
    shift = upper_shift(model, encoder, calib)
    train_s = time.perf_counter() - t0
    logs = predict_log(model, encoder, [p.prompt for p in val])
    metrics = evaluate(
        np.expm1(logs[:, 0]),
        np.expm1(logs[:, 1] + shift),
        [p.response_tokens for p in val],
        edges,
    )
    encoder.tokenizer.save(str(out / "tokenizer.json"))
    hashes = write_hashes(out, (p.prompt for p in fit_pairs))
    export_onnx(model, out / "model.onnx", encoder.tokenizer.get_vocab_size(), encoder.max_len)
    meta = {
        "kind": kind,
        "head": encoder.head,
        "tail": encoder.tail,
        "vocab_size": encoder.tokenizer.get_vocab_size(),
        "quantiles": [0.5, 0.9],
        "bucket_edges": list(edges),
        "params": sum(p.numel() for p in model.parameters()),
        "train_pairs": len(fit_pairs),
        "calibration_pairs": len(calib),
        "upper_log_shift": shift,
        "val_pairs": len(val),
        "test_pairs": test_pairs,
        "split": "conversation hash, then deduplicated by normalised prompt (data.dedup)",
        "prompt_hashes": hashes,
        "epochs": epochs,
        "seed": seed,
        "train_s": round(train_s, 1),
        "source": source,
        "val_metrics": metrics,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_model_card(out, meta)
    log(f"{kind}: {json.dumps(metrics)} in {train_s:.0f}s -> {out}")
    return meta


def write_model_card(out: str | Path, meta: dict[str, Any]) -> Path:
    """MODEL_CARD.md beside the artifact: data, split, metrics and the command, from meta."""
    m = meta["val_metrics"]
    text = f"""# Response-length predictor: `{meta["kind"]}`

- **Task**: from a prompt's text, the length of the model's response in tokens: the median
  (point estimate), the p90 (upper bound the scheduler pads KV reservations with) and a bucket
  id under the scheduler's edges {meta["bucket_edges"]}.
- **Data**: `{meta["source"]}`. For `sharegpt`: `../shared/data/sharegpt_v3_pairs.jsonl.gz`
  (ShareGPT V3 human -> gpt pairs; label `response_tokens`, cl100k tokens). Research and
  benchmarking use only: the data's terms are unclear (see the data README).
- **Split**: {meta.get("split", "by conversation id (a CRC32 hash)")}: a conversation's pairs
  sit on one side, except those whose normalised prompt an earlier side (training first)
  already holds, which move there. {meta["train_pairs"]} training pairs,
  {meta["calibration_pairs"]} calibration pairs (they set the p90 shift),
  {meta["val_pairs"]} validation pairs, {meta.get("test_pairs", 0)} test pairs (held out).
  `{meta.get("prompt_hashes", {}).get("file", "-")}` holds hashes of the normalised training
  prompts (`ecoserve-predictor evaluate` reports the prompts never seen in training apart).
- **Model**: byte-level BPE ({meta["vocab_size"]} tokens) trained on the training prompts;
  first {meta["head"]} + last {meta["tail"]} tokens of a prompt plus log token, character and
  line counts; {meta["params"]:,} parameters; pinball loss on log length at quantiles
  {meta["quantiles"]}; {meta["epochs"]} epochs, seed {meta["seed"]}, {meta["train_s"]} s on
  the build machine's CPU. p90 raised by {meta["upper_log_shift"]:.3f} in log space
  (split-conformal, on the calibration pairs).
- **Validation** ({m["n"]} pairs): Spearman {m["spearman"]:.3f}, MAE {m["mae"]:.1f} tokens,
  within one bucket {m["within_1_bucket"]:.3f}, p90 coverage {m["coverage_upper"]:.3f}.
- **Limits**: English chat prompts; a prompt such as "continue" depends on history the model
  does not see; lengths are those ChatGPT produced, not the served model's (retrain from the
  request store: `ecoserve-predictor retrain --db URL --out DIR`).
- **Rebuild**: `make train-predictor` (= `ecoserve-predictor train --data-dir ../shared/data
  --kind {meta["kind"]} --epochs {meta["epochs"]} --out
  services/predictor/ecoserve_predictor/artifact`); deterministic on one machine.
"""
    path = Path(out) / "MODEL_CARD.md"
    path.write_text(text)
    return path
