"""The response-length predictor: split, training, ONNX export, gRPC serving, retraining.

Everything runs on synthetic pairs (no data needed): their response length depends on the
words of the prompt, so a model that reads the text learns it in seconds.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
grpc = pytest.importorskip("grpc")
pytest.importorskip("onnxruntime")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from ecoserve_common.pb import predictor_pb2 as pb  # noqa: E402
from ecoserve_common.pb import predictor_pb2_grpc as pb_grpc  # noqa: E402
from ecoserve_predictor.__main__ import main  # noqa: E402
from ecoserve_predictor.data import split, synthetic_pairs  # noqa: E402
from ecoserve_predictor.features import Encoder, bucket_of  # noqa: E402
from ecoserve_predictor.runtime import OnnxPredictor  # noqa: E402
from ecoserve_predictor.server import MAX_PROMPTS, SERVICE_NAME, build_server  # noqa: E402
from ecoserve_predictor.train import fit, predict_log, train_artifact  # noqa: E402


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs(900, seed=1)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, pairs):
    out = tmp_path_factory.mktemp("artifact")
    train, val = split(pairs)
    meta = train_artifact(out, train, val, "encoder", vocab_size=400, epochs=4, log=lambda s: 0)
    return out, meta


def test_split_keeps_conversations_on_one_side(pairs):
    train, val = split(pairs, percent=30)
    assert val and train
    assert not {p.group for p in train} & {p.group for p in val}


def test_bucket_edges():
    assert list(bucket_of(np.array([0, 15, 16, 31, 5000]), (16, 32))) == [0, 0, 1, 1, 2]


def test_trained_model_reads_the_text(artifact):
    path, meta = artifact
    m = meta["val_metrics"]
    assert f"Spearman {m['spearman']:.3f}" in (path / "MODEL_CARD.md").read_text()
    # Length is set by the verb in the prompt, not by the prompt's length.
    assert m["spearman"] > 0.7 and m["n"] > 50
    assert 0.5 <= m["coverage_upper"] <= 1.0


def test_training_hashes_its_fit_prompts_and_calibrates_on_new_ones(artifact, pairs):
    """The artifact keeps hashes of the normalised prompts it was fit on (evaluate's
    unseen_prompt slice), and no calibration prompt is among them (dedup)."""
    from ecoserve_predictor.data import dedup
    from ecoserve_predictor.prompt_hashes import load_hashes, seen_in_training
    from ecoserve_predictor.train import CALIB_PERCENT

    path, meta = artifact
    fit, calib = dedup(split(split(pairs)[0], CALIB_PERCENT, salt="calibration"))
    assert (meta["train_pairs"], meta["calibration_pairs"]) == (len(fit), len(calib))
    hashes = load_hashes(path)
    assert len(hashes) == meta["prompt_hashes"]["count"]
    assert seen_in_training([p.prompt for p in fit], hashes).all()
    assert not seen_in_training([p.prompt for p in calib], hashes).any()


def test_onnx_matches_torch_for_any_batch_and_length(pairs):
    from ecoserve_predictor.features import train_tokenizer
    from ecoserve_predictor.train import export_onnx

    enc = Encoder(train_tokenizer((p.prompt for p in pairs), 400), head=12, tail=4)
    texts = [p.prompt for p in pairs[:7]] + ["Please list it", "x " * 300]
    for kind in ("encoder", "bag"):
        model = fit(kind, enc, pairs[:200], epochs=1, log=lambda s: 0)
        ref = predict_log(model, enc, texts)
        import tempfile
        from pathlib import Path

        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as d:
            path = export_onnx(model, Path(d) / "m.onnx", enc.tokenizer.get_vocab_size(), 16)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for batch in ([0], [0, 1, 2], list(range(len(texts)))):  # dynamic batch + seq
                ids, mask, feats = enc.encode([texts[i] for i in batch])
                (got,) = sess.run(None, {"ids": ids, "mask": mask, "feats": feats})
                np.testing.assert_allclose(got, ref[batch], rtol=1e-4, atol=1e-4)


def test_runtime_outputs(artifact):
    path, meta = artifact
    pred = OnnxPredictor(path, device="cpu")
    r = pred.predict(["Please translate the moon.", "Please write an essay about tax law."])
    assert np.all(r.upper >= r.point) and np.all(r.point >= 1)
    assert list(r.bucket) == list(bucket_of(r.point, meta["bucket_edges"]))
    assert r.point[1] > 3 * r.point[0]  # essay >> translation
    assert pred.providers == ["CPUExecutionProvider"]


def test_missing_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks model.onnx"):
        OnnxPredictor(tmp_path)


class Gate:
    """Wraps a predictor so a test can hold the batcher inside a batch."""

    def __init__(self, inner):
        self.inner, self.edges, self.model_id = inner, inner.edges, inner.model_id
        self.entered, self.release = threading.Event(), threading.Event()
        self.batch_sizes: list[int] = []

    def predict(self, prompts, histories=None):
        self.batch_sizes.append(len(prompts))
        self.entered.set()
        assert self.release.wait(10)
        return self.inner.predict(prompts, histories)


@pytest.fixture
def service(artifact):
    started = []

    def start(predictor=None, **kw):
        predictor = predictor or OnnxPredictor(artifact[0], device="cpu")
        server, port, batcher = build_server(predictor, "127.0.0.1:0", **kw)
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, batcher, channel))
        return pb_grpc.PredictorStub(channel), channel, batcher

    yield start
    for server, batcher, channel in started:
        channel.close()
        server.stop(0).wait()
        batcher.close()


def test_predict_health_and_reflection(service, artifact):
    stub, channel, _ = service()
    prompts = ["Please summarize the river.", "Please explain GPU memory."]
    resp = stub.Predict(pb.PredictRequest(prompts=prompts), timeout=10)
    direct = OnnxPredictor(artifact[0], device="cpu").predict(prompts)
    assert [p.point_tokens for p in resp.predictions] == pytest.approx(list(direct.point), 1e-5)
    assert [p.bucket for p in resp.predictions] == list(direct.bucket)
    assert list(resp.bucket_edges) == artifact[1]["bucket_edges"]
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for s in answer.list_services_response.service}
    assert SERVICE_NAME in names and "grpc.health.v1.Health" in names


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        ([], "no prompts"),
        (["fine", "   "], "prompt 1 is empty"),
        (["x"] * (MAX_PROMPTS + 1), "at most"),
        (["y" * 200_001], "characters"),
    ],
)
def test_bad_input_is_invalid_argument(service, prompts, match):
    stub, _, _ = service()
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(pb.PredictRequest(prompts=prompts), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in e.value.details()
    assert stub.Predict(pb.PredictRequest(prompts=["Please list it."]), timeout=10).predictions


def test_concurrent_calls_share_a_batch_and_expired_ones_are_dropped(service, artifact):
    gate = Gate(OnnxPredictor(artifact[0], device="cpu"))
    stub, _, batcher = service(gate, max_batch=64)
    first = stub.Predict.future(pb.PredictRequest(prompts=["Please list it."]), timeout=20)
    assert gate.entered.wait(10)  # the batcher is now inside batch 1
    late = stub.Predict.future(pb.PredictRequest(prompts=["too late"]), timeout=0.3)
    with pytest.raises(grpc.RpcError) as e:
        late.result()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    others = [
        stub.Predict.future(pb.PredictRequest(prompts=[f"Please explain {i}.", "x"]), timeout=20)
        for i in range(6)
    ]
    while batcher._queue.qsize() < 7:  # the expired call and the six others are queued
        threading.Event().wait(0.01)
    gate.release.set()
    assert len(first.result().predictions) == 1
    assert all(len(f.result().predictions) == 2 for f in others)
    assert gate.batch_sizes == [1, 12]  # the six calls ran as one batch, the expired one not
    assert batcher.expired == 1


def test_retrain_from_the_request_store(tmp_path, pairs):
    from ecoserve_scheduler.cli import main as scheduler_cli
    from ecoserve_scheduler.store import RequestStore, create_schema, make_engine

    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = make_engine(url)
    create_schema(engine)
    store = RequestStore(engine)
    for i, p in enumerate(pairs[:400]):
        store.add(f"q{i}", p.prompt, len(p.prompt.split()), 1024, float(i))
        if i % 10:  # every tenth request never finished: not training data
            store.finish(f"q{i}", p.response_tokens, float(i) + 1)
    served = tmp_path / "served.jsonl"
    assert scheduler_cli(["export-pairs", "--db", url, "--out", str(served)]) == 0
    out = tmp_path / "retrained"
    args = ["retrain", "--pairs", str(served), "--out", str(out), "--epochs", "3"]
    args += ["--vocab-size", "300"]
    assert main([*args, "--min-rows", "1000"]) == 2  # too few rows: refused, nothing written
    assert not out.exists()
    assert main([*args, "--min-rows", "100"]) == 0
    meta = OnnxPredictor(out, device="cpu").meta
    used = meta["train_pairs"] + meta["calibration_pairs"] + meta["val_pairs"]
    assert meta["source"] == "store" and used == 360


def test_upper_bound_is_calibrated_on_held_out_pairs(artifact):
    """The p90 output is shifted (on a calibration split) so ~90% of unseen lengths fall
    under it, however confident the head became on its own training prompts."""
    path, meta = artifact
    assert meta["calibration_pairs"] > 30
    pred = OnnxPredictor(path, device="cpu")
    assert pred.upper_shift == meta["upper_log_shift"]
    fresh = synthetic_pairs(600, seed=99)  # never seen
    r = pred.predict([p.prompt for p in fresh])
    coverage = np.mean(np.array([p.response_tokens for p in fresh]) <= r.upper)
    assert 0.8 <= coverage <= 0.99


def test_packaged_artifact_loads_and_predicts():
    """The committed artifact (trained on ShareGPT) serves without the data or torch."""
    pred = OnnxPredictor(device="cpu")
    assert pred.meta["source"] == "sharegpt" and pred.meta["val_metrics"]["n"] > 1000
    r = pred.predict(["Write a detailed essay on the history of Rome.", "Translate 'hi' to French"])
    assert len(r.point) == 2 and np.all(r.upper >= r.point) and np.all(r.point > 0)


def test_predictor_session_does_not_spin_between_calls():
    """It shares a CPU host with the model workers: ORT's default spin-wait burned ~8x the
    CPU of a call (bench/peer_vllm.py's process breakdown), so both pools are set to sleep."""
    opts = OnnxPredictor(device="cpu").session.get_session_options()
    for pool in ("intra_op", "inter_op"):
        assert opts.get_session_config_entry(f"session.{pool}.allow_spinning") == "0"


def test_serve_command_answers_health_then_exits_on_sigterm(artifact):
    """The real CLI process: SERVING on its port, a Predict call, exit 0 on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port

    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{repo / 'services/predictor'}:{repo / 'services/scheduler'}"
    cmd = [sys.executable, "-m", "ecoserve_predictor", "serve", "--artifact", str(artifact[0])]
    cmd += ["--address", f"127.0.0.1:{port}", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            health = health_pb2_grpc.HealthStub(channel)
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.PredictorStub(channel)
            assert stub.Predict(pb.PredictRequest(prompts=["Please list it."]), timeout=10)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM" in err
