"""Issue 17's sampling end to end: a real LiveEngine (and an EngineClient, whose core runs in its
own process) and a real worker process on the tiny model (CPU, fp32).

Every expected token and logprob comes from decoding straight on a ModelRunner with the
formula applied here token by token (`reference`): logprobs arrive aligned with the tokens and
equal the raw log_softmax, a greedy token's logprob is the largest, a frequency penalty changes
a repeating output exactly as the formula says, min_tokens keeps a stop id out until that many
tokens came, and the gRPC API streams the same logprobs per chunk.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
grpc = pytest.importorskip("grpc")
torch = pytest.importorskip("torch")
zmq = pytest.importorskip("zmq")

from test_live_engine import WAIT_S, start_worker, wait_for  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from ecoserve_common.pb import scheduler_pb2 as pb  # noqa: E402
from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc  # noqa: E402
from ecoserve_common.pb import worker_pb2 as wpb  # noqa: E402
from ecoserve_common.plan import TokenLogprob  # noqa: E402
from ecoserve_common.wire import decode, encode  # noqa: E402
from ecoserve_scheduler.core import Request, SamplingParams, SchedulerCore, make_policy  # noqa: E402
from ecoserve_scheduler.live import LiveEngine  # noqa: E402
from ecoserve_scheduler.live.api import SchedulerService, build_server  # noqa: E402
from ecoserve_scheduler.live.engine_client import EngineClient  # noqa: E402
from ecoserve_scheduler.live.frontend import ApiLimits, Frontend  # noqa: E402
from ecoserve_worker.model_runner import ModelRunner  # noqa: E402

PROMPT = [5, 40, 77, 90, 12, 33, 61]
N = 16


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = LiveEngine(SchedulerCore(make_policy("vllm")), auth_token="k", worker_timeout_s=10.0)
    eng.start()
    worker = start_worker(eng.address, "w0", model_dir)
    wait_for(lambda: eng.worker_ids() == ["w0"])
    yield eng
    worker.kill()
    worker.wait()
    eng.stop()


@pytest.fixture(scope="module")
def runner(model_dir):
    return ModelRunner(model_dir, num_blocks=16, block_size=16)


def reference(runner, prompt, n, presence=0.0, frequency=0.0, repetition=1.0, masked=(), upto=0):
    """Greedy decoding on `runner` with the penalties applied by the formula (repetition over
    prompt + outputs, then frequency and presence over the outputs, in the worker's order of
    operations) and `masked` ids at -inf for the first `upto` tokens. Returns (tokens, the raw
    log_softmax at each step)."""
    out: list[int] = []
    raws = []
    feed, start = list(prompt), 0
    while len(out) < n:
        logits = runner.step([("ref", feed, start, list(range(16)))])[0].float()
        raws.append(torch.log_softmax(logits, -1))
        x = logits.clone()
        for t in set(prompt) | set(out):
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
        for t in set(out):
            x[t] = x[t] - frequency * out.count(t) - presence
        if len(out) < upto:
            x[list(masked)] = float("-inf")
        out.append(int(x.argmax()))
        start += len(feed)
        feed = [out[-1]]
    return out, raws


def run(engine, rid: str, sp: SamplingParams, prompt=PROMPT, eos: int | None = None):
    h = engine.submit(
        Request(rid, len(prompt), 0.0, sp, prompt_token_ids=tuple(prompt), eos_token_id=eos)
    )
    assert h.wait(WAIT_S), rid
    return h


def check_logprobs(h, raws, n_top: int) -> None:
    """Aligned with the tokens, equal to the reference's raw log_softmax, top-N the N largest
    sorted, and (greedy) the sampled token the most likely one."""
    assert len(h.logprobs) == len(h.tokens)
    for token, lp, raw in zip(h.tokens, h.logprobs, raws, strict=False):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(raw[token]), abs=1e-4)
        assert [t for t, _ in lp.top] == raw.topk(n_top).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(raw.topk(n_top).values.tolist(), abs=1e-4)


def test_logprobs_arrive_aligned_and_greedy_tokens_are_the_most_likely(engine, runner):
    want, raws = reference(runner, PROMPT, 8)
    h = run(engine, "lp", SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3))
    assert h.tokens == want and h.finish_reason == "length"
    check_logprobs(h, raws, 3)
    for lp in h.logprobs:
        assert lp.top[0][0] == lp.token_id and lp.logprob == max(v for _, v in lp.top)
    plain = run(engine, "plain", SamplingParams(max_tokens=4, ignore_eos=True))
    assert plain.tokens == want[:4] and plain.logprobs == []  # none asked, none carried


def test_a_frequency_penalty_changes_a_repeating_output_as_the_formula_says(engine, runner):
    neutral = run(engine, "neutral", SamplingParams(max_tokens=N, ignore_eos=True))
    assert len(set(neutral.tokens)) < N  # the model repeats itself here
    want, raws = reference(runner, PROMPT, N, frequency=1.5)
    sp = SamplingParams(max_tokens=N, ignore_eos=True, frequency_penalty=1.5, logprobs=2)
    pen = run(engine, "freq", sp)
    assert pen.tokens == want != neutral.tokens, pen.finish_reason
    check_logprobs(pen, raws, 2)  # raw logprobs: before the penalty
    want, _ = reference(runner, PROMPT, N, presence=0.8, repetition=1.6)
    sp = SamplingParams(max_tokens=N, ignore_eos=True, presence_penalty=0.8, repetition_penalty=1.6)
    assert run(engine, "pres-rep", sp).tokens == want


def test_min_tokens_keeps_stop_ids_and_eos_out_until_that_many_tokens(engine, runner, model_dir):
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    neutral = run(engine, "free", SamplingParams(max_tokens=N), eos=eos).tokens
    stop = neutral[1]  # a stop id the model would emit as its second token
    first = neutral.index(stop)
    stopped = run(engine, "stops", SamplingParams(max_tokens=N, stop_token_ids=(stop,)), eos=eos)
    assert (stopped.finish_reason, len(stopped.tokens)) == ("stop", first + 1)
    sp = SamplingParams(max_tokens=N, stop_token_ids=(stop,), min_tokens=6)
    held = run(engine, "held", sp, eos=eos)
    assert len(held.tokens) >= sp.min_tokens and stop not in held.tokens[: sp.min_tokens]
    want, _ = reference(runner, PROMPT, len(held.tokens), masked=(stop, eos), upto=6)
    assert held.tokens == want
    assert held.finish_reason == ("stop" if want[-1] == stop else "length")


def test_the_engine_core_process_carries_logprobs_to_the_handle(model_dir, runner):
    client = EngineClient("vllm", auth_token="k", worker_timeout_s=10.0).start()
    worker = start_worker(client.address, "w0", model_dir)
    try:
        wait_for(lambda: client.worker_ids() == ["w0"])
        want, raws = reference(runner, PROMPT, 6)
        h = run(client, "proc", SamplingParams(max_tokens=6, ignore_eos=True, logprobs=4))
        assert h.tokens == want
        check_logprobs(h, raws, 4)
    finally:
        worker.kill()
        worker.wait()
        client.stop()


def test_grpc_streams_logprobs_per_chunk(engine, runner, model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    limits = ApiLimits(max_model_len=2048, vocab_size=512)
    server, port = build_server(
        SchedulerService(Frontend(engine, tok, None, limits)), "127.0.0.1:0"
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            req = pb.GenerateRequest(
                prompt_token_ids=PROMPT,
                max_tokens=6,
                ignore_eos=True,
                has_logprobs=True,
                logprobs=2,
            )
            chunks = list(stub.Generate(req, timeout=WAIT_S))
            done = stub.Complete(req, timeout=WAIT_S)
            with pytest.raises(grpc.RpcError) as e:
                bad = pb.GenerateRequest(prompt_token_ids=PROMPT, max_tokens=4, min_tokens=5)
                stub.Complete(bad, timeout=WAIT_S)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith("min_tokens: ")
    finally:
        server.stop(0).wait()
    want, raws = reference(runner, PROMPT, 6)
    streamed = [(t, lp) for c in chunks for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
    assert [t for t, _ in streamed] == want == list(done.token_ids)
    for (token, lp), raw, whole in zip(streamed, raws, done.logprobs, strict=True):
        assert lp.token_id == token and lp == whole
        assert lp.logprob == pytest.approx(float(raw[token]), abs=1e-4)
        assert list(lp.top_token_ids) == raw.topk(2).indices.tolist()


def next_plan(sock, timeout_s: float = 10.0):
    """The next plan the engine sends this raw peer (heartbeats and acks skipped)."""
    while sock.poll(int(timeout_s * 1000)):
        env, body = decode(sock.recv())
        if body == "plan":
            return env.plan
    raise AssertionError("no plan")


def run_async(engine, sp: SamplingParams):
    return engine.submit(Request("raw", 3, 0.0, sp, prompt_token_ids=(1, 2, 3)))


def test_a_result_with_malformed_logprobs_fails_its_step_not_the_engine():
    """A worker whose logprob columns do not fit together: that step fails (its requests are
    recomputed), the engine loop lives on, and the retried step's logprobs arrive."""
    eng = LiveEngine(SchedulerCore(make_policy("vllm")), auth_token="k", worker_timeout_s=30.0)
    eng.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(eng.address)
    try:
        reg = wpb.Register(auth_token="k", incarnation="i", model_id="raw", block_size=16)
        reg.num_blocks, reg.token_budget, reg.device = 64, 128, "raw"
        sock.send(encode("w0", reg))
        wait_for(lambda: eng.worker_ids() == ["w0"])
        h = run_async(eng, SamplingParams(max_tokens=1, ignore_eos=True, logprobs=1))
        plan = next_plan(sock)
        bad = wpb.StepResult(step_id=plan.step_id, tokens=[3], logprob_rows=[0])
        sock.send(encode("w0", bad))  # one row, no logprob value: the columns do not fit
        plan = next_plan(sock)  # recomputed: the engine is alive and plans again
        good = wpb.StepResult(step_id=plan.step_id, tokens=[3], logprob_rows=[0])
        good.sampled_logprobs.append(-0.5)
        good.top_counts.append(1)
        good.top_ids.append(3)
        good.top_logprobs.append(-0.5)
        sock.send(encode("w0", good))
        assert h.wait(WAIT_S) and eng.failure is None
        assert h.tokens == [3] and h.logprobs == [TokenLogprob(3, -0.5, ((3, -0.5),))]
    finally:
        sock.close(0)
        ctx.term()
        eng.stop()
