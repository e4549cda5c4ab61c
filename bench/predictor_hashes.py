"""Write the packaged predictor artifact's training-prompt hashes (train_prompts.sha256).

    python bench/predictor_hashes.py [--data-dir ../shared/data] [--artifact DIR]

The packaged artifact was trained before training wrote this file. Its fit pairs are rebuilt
with the rule it was trained under (meta.json: seed 0, ShareGPT; `data.split` by conversation,
10% validation, then 10% of the training conversations, salt "calibration", for the p90 shift;
no prompt deduplication), and the run refuses unless their count equals meta's `train_pairs`
and `calibration_pairs`. Then it writes the hashes and records them in meta.json (the model is
not touched). New trainings write the file themselves (train.train_artifact).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services/predictor"))

from ecoserve_predictor.data import DEFAULT_DATA_DIR, load_sharegpt, split  # noqa: E402
from ecoserve_predictor.prompt_hashes import write_hashes  # noqa: E402
from ecoserve_predictor.runtime import PACKAGED_ARTIFACT  # noqa: E402
from ecoserve_predictor.train import CALIB_PERCENT  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--artifact", default=str(PACKAGED_ARTIFACT))
    a = ap.parse_args(argv)
    meta_path = Path(a.artifact) / "meta.json"
    meta = json.loads(meta_path.read_text())
    if meta["source"] != "sharegpt":
        raise SystemExit(f"{a.artifact} was trained on {meta['source']!r}, not sharegpt")
    train, val = split(load_sharegpt(a.data_dir))
    fit, calib = split(train, CALIB_PERCENT, salt="calibration")
    got = (len(fit), len(calib), len(val))
    want = (meta["train_pairs"], meta["calibration_pairs"], meta["val_pairs"])
    if got != want:
        raise SystemExit(f"rebuilt split (fit, calibration, val) {got} != meta.json's {want}")
    meta["split"] = "conversation hash (data.split), not deduplicated by prompt"
    meta["prompt_hashes"] = write_hashes(a.artifact, (p.prompt for p in fit))
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{len(fit)} fit pairs, split {got} as in meta.json: {meta['prompt_hashes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
