"""History on the wire (issue 20 item 1): a chat request's earlier answers reach the predictor
service (proto `PredictRequest.histories`) and change its guess; a completion sends none."""

from __future__ import annotations

import grpc
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("openai")
from http_fakes import serve_fakes  # noqa: E402

from ecoserve_common.pb import predictor_pb2 as pb  # noqa: E402
from ecoserve_common.pb import predictor_pb2_grpc as pb_grpc  # noqa: E402
from ecoserve_predictor.runtime import PACKAGED_ARTIFACT, OnnxPredictor  # noqa: E402
from ecoserve_predictor.server import build_server  # noqa: E402
from ecoserve_scheduler.live.prediction import Prediction, PredictorClient  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper."


@pytest.fixture(scope="module")
def served():
    predictor = OnnxPredictor(PACKAGED_ARTIFACT, device="cpu")
    assert predictor.history_blend is not None, "the packaged artifact ships the blend"
    server, port, batcher = build_server(predictor, "127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.PredictorStub(channel), f"127.0.0.1:{port}", predictor
    channel.close()
    server.stop(0).wait()
    batcher.close()


def test_the_service_blends_each_prompts_history(served):
    stub, _, predictor = served
    req = pb.PredictRequest(prompts=[PROMPT] * 3)
    req.histories.extend([pb.History(answer_tokens=[30, 900]), pb.History(answer_tokens=[20])])
    req.histories.append(pb.History())  # no earlier answer: the prompt model alone
    long, short, alone = stub.Predict(req, timeout=10).predictions
    assert long.point_tokens > short.point_tokens and long.upper_tokens > short.upper_tokens
    assert alone.point_tokens == pytest.approx(float(predictor.model_predict([PROMPT]).point[0]))
    bare = stub.Predict(pb.PredictRequest(prompts=[PROMPT]), timeout=10).predictions[0]
    assert bare.point_tokens == pytest.approx(alone.point_tokens)


def test_histories_must_be_none_or_one_per_prompt(served):
    stub = served[0]
    req = pb.PredictRequest(prompts=[PROMPT, PROMPT], histories=[pb.History(answer_tokens=[5])])
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 histories for 2 prompts" in e.value.details()


def test_the_schedulers_client_sends_the_history(served):
    client = PredictorClient(served[1], timeout_s=10)
    try:
        long, short = client.predict(PROMPT, (900,)), client.predict(PROMPT, (20,))
        assert not long.fallback and long.point > short.point
        assert client.predict(PROMPT) == client.predict(PROMPT, ())
    finally:
        client.close()


class Recording(PredictorClient):
    def __init__(self) -> None:
        super().__init__(None)
        self.histories: list[tuple[int, ...]] = []

    def predict(self, prompt: str, history=()) -> Prediction:
        self.histories.append(tuple(history))
        return self.default


@pytest.fixture
def api():
    yield from serve_fakes()


def test_chat_sends_earlier_answers_lengths_and_completions_none(api):
    client, _, _, tokenizer, frontend = api()
    frontend.predictor = recording = Recording()
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    client.completions.create(model="tiny", prompt="plain", max_tokens=2)
    # The fake tokenizer makes one token a character: "hello there" is 11, "ok" 2.
    assert recording.histories == [(11, 2), ()]
    assert len(tokenizer.encode("hello there")) == 11
