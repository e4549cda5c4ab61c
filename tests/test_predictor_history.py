"""History blend of the response-length predictor (issue 20 item 1, predictor side).

Runs on the packaged artifact (ONNX Runtime, no torch) and made-up pairs; the one check against
the ShareGPT file skips when ../shared/data is absent.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from ecoserve_predictor import __main__ as cli  # noqa: E402
from ecoserve_predictor.data import (  # noqa: E402
    DEFAULT_DATA_DIR,
    HONEST_VAL_PERCENT,
    TEST_PERCENT,
    Pair,
    honest_split,
    is_validation,
    synthetic_pairs,
)
from ecoserve_predictor.evaluate import artifact_hashes  # noqa: E402
from ecoserve_predictor.history import (  # noqa: E402
    FEATURES,
    META_KEY,
    HistoryBlend,
    Turn,
    answer_lengths,
    fit_artifact,
    fit_blend,
    fit_side,
)
from ecoserve_predictor.prompt_hashes import HASH_FILE, prompt_hashes  # noqa: E402
from ecoserve_predictor.runtime import PACKAGED_ARTIFACT, OnnxPredictor  # noqa: E402

PROMPTS = ["continue", "Write an essay about the moon.", "Translate 'hello' into French."]


@pytest.fixture(scope="module")
def packaged() -> OnnxPredictor:
    return OnnxPredictor(PACKAGED_ARTIFACT, device="cpu")


def _artifact_copy(tmp_path):
    art = tmp_path / "artifact"
    shutil.copytree(PACKAGED_ARTIFACT, art)
    meta = json.loads((art / "meta.json").read_text())
    meta.pop(META_KEY, None)
    (art / "meta.json").write_text(json.dumps(meta))
    return art


def test_packaged_artifact_ships_a_blend_that_reads_the_previous_answer(packaged):
    blend = packaged.history_blend
    assert blend is not None, (
        "packaged meta.json lacks history_blend (ecoserve-predictor fit-history)"
    )
    coef = dict(zip(FEATURES, blend.coef, strict=True))
    assert coef["log_model_point"] > 0 and coef["log_prev_answer"] + coef["log_mean_answer"] > 0
    assert blend.upper_shift > 0
    assert blend.fit["rows"] >= 1000 and "train" in blend.fit["side"]


def test_rows_without_history_get_the_model_prediction_unchanged(packaged):
    raw = packaged.model_predict(PROMPTS)
    no_known_answer = [(), None, [Turn("hi", None, None)]]
    for histories in (None, [()] * 3, no_known_answer):
        got = packaged.predict(PROMPTS, histories)
        np.testing.assert_array_equal(got.point, raw.point)
        np.testing.assert_array_equal(got.upper, raw.upper)
        np.testing.assert_array_equal(got.bucket, raw.bucket)
    # in a batch beside rows with history, a history-less row is still untouched
    mixed = packaged.predict(PROMPTS, [(), [Turn("q", None, 500)], ()])
    assert mixed.point[0] == raw.point[0] and mixed.point[2] == raw.point[2]
    assert mixed.upper[0] == raw.upper[0] and mixed.point[1] != raw.point[1]


def test_a_long_previous_answer_predicts_longer_than_a_short_one(packaged):
    earlier = Turn("Tell me about GPUs.", None, 600)
    long_prev = [[earlier, Turn("And memory?", None, 900)]] * 3
    short_prev = [[earlier, Turn("And memory?", None, 20)]] * 3
    long_, short = packaged.predict(PROMPTS, long_prev), packaged.predict(PROMPTS, short_prev)
    assert np.all(long_.point > short.point) and np.all(long_.upper > short.upper)
    assert np.all(long_.upper >= long_.point) and np.all(short.upper >= short.point)
    # dicts and bare counts are histories too
    assert answer_lengths([{"response_tokens": 7}, 9, Turn("x", None, None)]) == [7.0, 9.0]
    with pytest.raises(ValueError, match="histories"):
        packaged.predict(PROMPTS, [()])


def test_blend_applies_its_coefficients_in_log_space():
    blend = HistoryBlend((0.0, 0.5, 0.5, 0.0, 0.0), upper_shift=0.2)
    point, upper = np.array([99.0, 99.0]), np.array([200.0, 200.0])
    p, u = blend.apply(point, upper, [[Turn("a", None, 9999)], []])
    assert p[0] == pytest.approx(np.expm1(0.5 * np.log(100) + 0.5 * np.log(10000)))
    assert u[0] == pytest.approx(np.expm1(np.log1p(p[0]) + 0.2))
    assert (p[1], u[1]) == (99.0, 200.0) and point[0] == 99.0  # inputs not modified


def test_fit_recovers_a_known_blend_and_calibrates_its_upper_bound():
    rng = np.random.default_rng(0)
    n = 4000
    model = np.expm1(rng.normal(5, 1, n))
    prev = np.expm1(rng.normal(5, 1, n))
    y = 0.3 + 0.4 * np.log1p(model) + 0.5 * np.log1p(prev) + rng.normal(0, 0.3, n)
    hist = [[Turn("p", None, int(round(v)))] for v in prev]
    blend = fit_blend(model, np.expm1(y), hist)
    assert blend.coef[1] == pytest.approx(0.4, abs=0.05)
    assert blend.coef[2] + blend.coef[3] == pytest.approx(0.5, abs=0.05)
    p, u = blend.apply(model, model, hist)
    assert 0.88 <= np.mean(np.expm1(y) <= u) <= 0.92
    with pytest.raises(ValueError, match="rows with history"):
        fit_blend(model[:10], np.expm1(y[:10]), hist[:10])


def test_coefficients_round_trip_through_the_artifact(tmp_path):
    art = _artifact_copy(tmp_path)
    assert OnnxPredictor(art, device="cpu").history_blend is None
    entry = fit_artifact(art, synthetic_pairs(300))
    assert json.loads((art / "meta.json").read_text())[META_KEY] == entry
    loaded = OnnxPredictor(art, device="cpu").history_blend
    assert loaded == HistoryBlend.from_meta(entry)
    assert loaded.to_meta() == entry and len(entry["coef"]) == len(FEATURES)
    with pytest.raises(ValueError, match="features"):
        HistoryBlend.from_meta(entry | {"features": ["bias"]})


def test_fit_uses_only_training_conversations_with_history_and_unseen_prompts():
    groups = [f"c{i}" for i in range(400)]
    pairs = [Pair(g, f"{g} turn {t}", 10 + t, 1, f"{g}_0", t) for g in groups for t in range(3)]
    training = [
        g
        for g in groups
        if not is_validation(g, TEST_PERCENT)
        and not is_validation(g, HONEST_VAL_PERCENT, salt="validation")
    ]
    assert 0 < len(training) < len(groups)
    seen = f"{training[0]} turn 1"  # a later turn of a training conversation the model fit
    rows, hist = fit_side(pairs, np.sort(prompt_hashes([seen])))
    chosen = [pairs[i] for i in rows]
    assert chosen and all(p.turn > 0 for p in chosen) and seen not in {p.prompt for p in chosen}
    assert {p.group for p in chosen} == set(training)  # no validation or test conversation
    assert len(chosen) == 2 * len(training) - 1  # every later turn of them but the seen one
    for p, h in zip(chosen, hist, strict=True):
        assert [t.response_tokens for t in h] == [10 + t for t in range(p.turn)]


def test_fit_history_command_passes_the_training_side_only(monkeypatch, tmp_path):
    pairs = synthetic_pairs(600)
    got = {}
    monkeypatch.setattr("ecoserve_predictor.data.load_sharegpt", lambda _d: pairs)
    monkeypatch.setattr(
        "ecoserve_predictor.history.fit_artifact",
        lambda art, train, *_a: got.update(art=art, train=train) or {"coef": []},
    )
    assert cli.main(["fit-history", "--data-dir", "x", "--artifact", str(tmp_path)]) == 0
    train, val, test = honest_split(pairs)
    assert got["train"] == train and got["art"] == str(tmp_path)
    held_out = {p.prompt for p in val + test}
    assert not held_out & {p.prompt for p in got["train"]}


def test_packaged_blend_was_fit_on_the_sharegpt_training_side(packaged):
    try:
        from ecoserve_predictor.data import load_sharegpt

        pairs = load_sharegpt(DEFAULT_DATA_DIR)
    except FileNotFoundError as exc:
        pytest.skip(f"ShareGPT pairs not available ({exc}); the synthetic checks above still run")
    assert (PACKAGED_ARTIFACT / HASH_FILE).is_file()
    rows, _hist = fit_side(honest_split(pairs)[0], artifact_hashes(packaged, PACKAGED_ARTIFACT))
    assert packaged.history_blend.fit["rows"] == len(rows)
