"""Honest splits and `ecoserve-predictor evaluate` (issue 20, items 2 and 3).

Runs on made-up pairs and the packaged artifact (ONNX Runtime, no torch, no data); the one
check against the ShareGPT file skips when ../shared/data is absent.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from ecoserve_predictor.__main__ import main  # noqa: E402
from ecoserve_predictor.data import (  # noqa: E402
    DEFAULT_DATA_DIR,
    Pair,
    dedup,
    honest_split,
    is_validation,
    normalise,
    synthetic_pairs,
)
from ecoserve_predictor.evaluate import MIN_ROWS, evaluate_rows, histories, read_rows  # noqa: E402
from ecoserve_predictor.metrics import bootstrap_ci, evaluate  # noqa: E402
from ecoserve_predictor.prompt_hashes import (  # noqa: E402
    HASH_FILE,
    load_hashes,
    seen_in_training,
    write_hashes,
)
from ecoserve_predictor.runtime import PACKAGED_ARTIFACT, OnnxPredictor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASKS = {"translate": 40, "summarize": 120, "list": 200, "explain": 320, "write an essay on": 600}


def test_normalise_folds_width_case_and_whitespace():
    assert normalise("  Continue\n\n PLEASE\t") == "continue please"
    assert normalise("ｃｏｎｔｉｎｕｅ") == "continue"  # full-width forms (NFKC)
    assert normalise("Straße") == normalise("STRASSE")  # casefold, not just lower
    assert normalise("a\u00a0b") == "a b"  # a no-break space is whitespace
    assert normalise("continue.") != normalise("continue")  # punctuation is kept


def test_honest_split_shares_no_normalised_prompt_across_sides():
    pairs = synthetic_pairs(1500, seed=3)  # many prompts recur across conversations
    variants = ["continue", "Continue", " CONTINUE\n", "ｃｏｎｔｉｎｕｅ", "more", "More"]
    pairs += [Pair(f"rep{i}", variants[i % 6], 100, 1, f"rep{i}_0", 2) for i in range(300)]
    train, val, test = honest_split(pairs)
    assert train and val and test
    assert sorted(map(id, train + val + test)) == sorted(map(id, pairs))  # nothing dropped
    sides = [{normalise(p.prompt) for p in side} for side in (train, val, test)]
    assert not sides[0] & sides[1] and not sides[0] & sides[2] and not sides[1] & sides[2]
    assert {"continue", "more"} <= sides[0]  # a recurring prompt trains, never counts as held out
    # The test side only holds conversations the plain conversation split held out.
    assert all(is_validation(p.group, 10) for p in test)


def test_dedup_moves_to_the_first_side_holding_the_prompt():
    a, b, c = (Pair(g, t, 1) for g, t in (("a", "Hi  there"), ("b", "hi there"), ("c", "x")))
    assert dedup([[c], [a], [b]]) == [[c], [a, b], []]
    assert dedup([[b], [a, c]]) == [[b, a], [c]]


def test_prompt_hashes_are_exact_on_normalised_text(tmp_path):
    info = write_hashes(tmp_path, ["Hello  World", "hello world", "Second prompt"])
    assert info["count"] == 2 and (tmp_path / HASH_FILE).stat().st_size == 16
    hashes = load_hashes(tmp_path)
    assert list(hashes) == sorted(hashes)
    query = ["HELLO WORLD", "second   prompt\n", "Second prompt!", "hello"]
    assert list(seen_in_training(query, hashes)) == [True, True, False, False]
    assert load_hashes(tmp_path / "absent") is None
    assert not seen_in_training(["x"], np.array([], dtype=np.uint64)).any()


def test_packaged_artifact_ships_its_training_prompt_hashes():
    meta = json.loads((PACKAGED_ARTIFACT / "meta.json").read_text())
    hashes = load_hashes(PACKAGED_ARTIFACT)
    assert len(hashes) == meta["prompt_hashes"]["count"] > 30_000
    assert np.all(np.diff(hashes.astype(np.float64)) >= 0) and len(np.unique(hashes)) == len(hashes)


def test_packaged_hashes_match_the_split_it_was_trained_on():
    """Rebuilds the packaged artifact's fit pairs from the data (the pre-dedup rule) and checks
    the shipped hashes are theirs: the sizes must equal meta.json's, the hashes the file's."""
    from ecoserve_predictor.data import load_sharegpt, split
    from ecoserve_predictor.prompt_hashes import prompt_hashes
    from ecoserve_predictor.train import CALIB_PERCENT

    try:
        pairs = load_sharegpt(DEFAULT_DATA_DIR)
    except FileNotFoundError as exc:
        pytest.skip(f"needs the ShareGPT file: {exc}")
    meta = json.loads((PACKAGED_ARTIFACT / "meta.json").read_text())
    train, val = split(pairs)
    fit, calib = split(train, CALIB_PERCENT, salt="calibration")
    assert (len(fit), len(calib), len(val)) == (
        meta["train_pairs"],
        meta["calibration_pairs"],
        meta["val_pairs"],
    )
    rebuilt = np.unique(prompt_hashes(p.prompt for p in fit))
    assert np.array_equal(rebuilt, load_hashes(PACKAGED_ARTIFACT))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    true = rng.integers(10, 800, 400)
    point = true * rng.lognormal(0, 0.6, 400)
    upper = point * 1.8
    ci = bootstrap_ci(point, upper, true, resamples=300, seed=5)
    assert ci == bootstrap_ci(point, upper, true, resamples=300, seed=5)
    assert ci != bootstrap_ci(point, upper, true, resamples=300, seed=6)
    est = evaluate(point, upper, true)
    for name, (lo, hi) in ci.items():
        assert lo < est[name] < hi, name
    assert 0 < ci["spearman"][1] - ci["spearman"][0] < 0.3


def _rows(n_ids: int = 60) -> list[dict]:
    """n_ids records of three turns (0, 2, 4) with distinct prompts, plus one record whose only
    row is a later turn (its history is not in the file)."""
    rng = np.random.default_rng(0)
    asks = list(ASKS)
    rows = []
    for i in range(n_ids):
        for turn in (0, 2, 4):
            ask = asks[(i + turn) % len(asks)]
            n = int(ASKS[ask] * rng.lognormal(0, 0.3))
            prompt = f"Please {ask} topic {i}, part {turn}."
            rows.append({"id": f"c{i}_0", "turn": turn, "prompt": prompt, "response_tokens": n})
    rows.append({"id": "orphan_1", "turn": 3, "prompt": "and then?", "response_tokens": 90})
    rng.shuffle(rows)  # history comes from `turn`, not from the order of the file
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.fixture
def artifact(tmp_path):
    """The packaged model, with a hash file naming 20 of _rows' prompts as training prompts
    (written in another case and spacing: the match is on normalised text)."""
    out = tmp_path / "artifact"
    out.mkdir()
    for name in ("model.onnx", "tokenizer.json", "meta.json"):
        os.symlink(PACKAGED_ARTIFACT / name, out / name)
    trained = [r["prompt"] for r in _rows() if r["id"] in {f"c{i}_0" for i in range(20)}]
    trained = [f"  {p.upper()} " for p in trained if "part 2" in p]
    write_hashes(out, trained)
    return out, {normalise(p) for p in trained}


def test_evaluate_command_reports_slices_with_intervals(tmp_path, artifact):
    path, trained = artifact
    rows = _rows()
    data = _write(tmp_path / "pairs.jsonl.gz", rows)
    out = tmp_path / "eval.json"
    args = ["evaluate", "--data", str(data), "--artifact", str(path), "--out", str(out)]
    assert main([*args, "--device", "cpu", "--resamples", "200"]) == 0
    r = json.loads(out.read_text())
    n_seen = sum(normalise(row["prompt"]) in trained for row in rows)
    assert n_seen == 20
    assert r["n"] == len(rows) == 181
    assert r["first_turn"]["n"] == 60 and r["later_turns"]["n"] == 121
    assert r["unseen_prompt"]["n"] == 161
    assert (
        r["seen_prompt"]["n"] == 20
        and r["seen_prompt"]["spearman"] is None
        and r["seen_prompt"]["ci95"] is None
    )  # < MIN_ROWS
    assert MIN_ROWS > 20
    assert r["history"] == {"rows_with_history": 120, "later_turns_without": 1, "blend": True}
    for m in (r, r["first_turn"], r["later_turns"], r["unseen_prompt"]):
        for name, (lo, hi) in m["ci95"].items():
            assert lo <= m[name] <= hi, name
    # The model reads the text: essays come out longer than translations. (Later turns here
    # change the ask at random, so their history misleads the blend: first turns only.)
    assert r["first_turn"]["spearman"] > 0.3


def test_evaluate_matches_the_served_predictions_and_passes_history(artifact):
    path, _ = artifact
    rows = read_rows(_write(Path(path).parent / "p.jsonl", _rows(12)))

    class Recording(OnnxPredictor):
        def predict(self, prompts, histories=None):
            self.seen = getattr(self, "seen", {})
            self.seen.update(zip(prompts, histories, strict=True))
            return super().predict(prompts, histories)

    pred = Recording(path, device="cpu")
    r = evaluate_rows(pred, rows, load_hashes(path), resamples=50)
    late = pred.seen["Please list topic 3, part 4."]
    assert [t.prompt for t in late] == [
        "Please explain topic 3, part 0.",
        "Please translate topic 3, part 2.",
    ]
    assert pred.seen["and then?"] == () and pred.seen["Please explain topic 3, part 0."] == ()
    # Same numbers as predicting the rows, with their histories, in one plain batch.
    plain = OnnxPredictor(path, device="cpu").predict([row.prompt for row in rows], histories(rows))
    expect = evaluate(plain.point, plain.upper, [row.response_tokens for row in rows])
    assert r["mae"] == pytest.approx(expect["mae"], rel=1e-4)
    assert r["spearman"] == pytest.approx(expect["spearman"], abs=1e-6)


def test_evaluate_without_hashes_reports_unseen_as_unknown(tmp_path, artifact):
    path, _ = artifact
    (path / HASH_FILE).unlink()
    rows = read_rows(_write(tmp_path / "p.jsonl", _rows(12)))
    r = evaluate_rows(OnnxPredictor(path, device="cpu"), rows, load_hashes(path), resamples=50)
    assert r["unseen_prompt"]["n"] is None and "hashes" in r["unseen_prompt"]["note"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no such file"),
        ('{"id": "a", "turn": 0, "prompt": "hi"}\n', ":1: missing response_tokens"),
        ('{"id": "a", "turn": 0, "prompt": "hi", "response": "yo"}\n', "`response` text"),
        (
            '{"id": "a", "turn": 0, "prompt": "hi", "response_tokens": 3}\nnot json\n',
            ":2: not JSON",
        ),
        ('{"turn": 0, "prompt": "hi", "response_tokens": 3}\n', "missing id"),
        ('{"id": "a", "turn": "x", "prompt": "hi", "response_tokens": 3}\n', "integers"),
        ('{"id": "a", "turn": 0, "prompt": "  ", "response_tokens": 3}\n', "prompt is empty"),
        ("\n", "no pairs"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, caplog, content, match):
    data = tmp_path / "bad.jsonl"
    if content is not None:
        data.write_text(content)
    out = tmp_path / "out.json"
    assert main(["evaluate", "--data", str(data), "--out", str(out)]) == 2
    assert match in caplog.text and not out.exists()


def test_bad_gzip_and_the_real_command_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    env = dict(os.environ, PYTHONPATH=str(REPO / "services/predictor"))
    cmd = [sys.executable, "-m", "ecoserve_predictor", "evaluate", "--data", str(bad)]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "o.json")], env=env, capture_output=True)
    assert proc.returncode == 2
    assert b"unreadable" in proc.stderr and str(bad).encode() in proc.stderr


def test_bench_writes_the_split_in_the_shared_format(tmp_path):
    """bench/predictor.py hands `evaluate` a file it reads back row for row."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import predictor as bench
    finally:
        sys.path.remove(str(REPO / "bench"))
    pairs = synthetic_pairs(40)
    result = bench.run_evaluate(PACKAGED_ARTIFACT, pairs, tmp_path, "syn")
    rows = read_rows(tmp_path / "syn.jsonl.gz")
    assert [(r.id, r.turn, r.prompt) for r in rows] == [(p.record, p.turn, p.prompt) for p in pairs]
    assert result["n"] == 40 and result["first_turn"]["n"] == 14
