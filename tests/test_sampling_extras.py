"""Penalties, min_tokens and logprobs in the worker's sampler (issue 17), on crafted logits.

Each expectation is computed here from the formula (OpenAI's presence / frequency penalties,
vLLM's / HF's repetition penalty, vLLM's min_tokens, raw log_softmax logprobs), never
hard-coded: the sampler must change the logits exactly as the formula says, and the argmax with
them. Plans are built as the scheduler builds them (ScheduledSeq / DecodeBatch with prompt
lengths) and read through `StepInputs.from_plan`, as an in-process worker reads them.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ecoserve_common.plan import BatchPlan, DecodeBatch, ScheduledSeq, StepInputs  # noqa: E402
from ecoserve_common.sampling import SamplingParams  # noqa: E402
from ecoserve_worker.penalties import TokenHistory  # noqa: E402
from ecoserve_worker.sampling import RowErrors, Sampler  # noqa: E402

VOCAB = 8
EOS = 7


def prefill(rid: str, tokens, sp: SamplingParams, prompt_len: int, start: int = 0, sample=True):
    return ScheduledSeq(
        rid, start, len(tokens), (0,), sample, sp, tuple(tokens), prompt_len=prompt_len
    )


def step(prefills=(), decodes=()) -> StepInputs:
    """decodes: (request id, position, fed token, sampling, prompt_len) rows."""
    d = DecodeBatch(
        tuple(r[0] for r in decodes),
        tuple(r[1] for r in decodes),
        tuple([0] for _ in decodes),
        tuple(r[3] for r in decodes),
        tuple(r[2] for r in decodes),
        tuple(r[4] for r in decodes),
    )
    return StepInputs.from_plan(BatchPlan(1, "w0", d, tuple(prefills)))


def expected(logits, prompt, outputs, presence=0.0, frequency=0.0, repetition=1.0):
    """The formula, one token at a time: repetition over prompt + outputs (divide a positive
    logit, multiply a negative one), then frequency x count and presence over the outputs."""
    out = logits.clone()
    for t in set(prompt) | set(outputs):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(outputs):
        out[t] -= frequency * outputs.count(t) + presence
    return out


BASE = torch.tensor([0.0, -1.0, 2.0, 3.0, 2.9, 2.5, 0.1, 0.2])
PROMPT, OUTPUTS = [1, 2], [3, 3, 4]


# Each case moves the argmax: the penalties push repeated tokens below token 5 (never seen),
# and a repetition penalty below 1 lifts a repeated token above it.
PROMOTING = torch.tensor([0.0, -1.0, 2.0, 3.0, 2.9, 3.5, 0.1, 0.2])


@pytest.mark.parametrize(
    ("penalty", "base"),
    [
        ({"frequency_penalty": 0.3}, BASE),
        ({"presence_penalty": 0.6}, BASE),
        ({"repetition_penalty": 2.0}, BASE),
        ({"repetition_penalty": 0.5}, PROMOTING),
        ({"presence_penalty": -0.4, "frequency_penalty": 0.7, "repetition_penalty": 1.3}, BASE),
    ],
)
def test_penalties_change_the_logits_and_argmax_as_the_formula_says(penalty, base):
    sp = SamplingParams(**penalty)
    # A recompute: one prefill carries prompt + outputs, and the history is rebuilt from it.
    inp = step([prefill("a", PROMPT + OUTPUTS, sp, prompt_len=len(PROMPT))])
    logits = base.clone()[None]
    tokens = Sampler("cpu", 8).sample(logits, inp)
    names = {"presence_penalty": "presence", "frequency_penalty": "frequency"}
    kw = {names.get(k, "repetition"): v for k, v in penalty.items()}
    want = expected(base, PROMPT, OUTPUTS, **kw)
    assert torch.allclose(logits[0], want)
    assert tokens == [int(want.argmax())]
    assert int(want.argmax()) != int(base.argmax())


def test_only_penalized_rows_change_and_the_rest_keep_their_greedy_token():
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():  # as the runner's forward returns them
        logits = torch.randn(3, VOCAB, generator=g)
    raw = logits.clone()
    pen = SamplingParams(frequency_penalty=1.5, repetition_penalty=1.2)
    inp = step(
        decodes=[("plain", 9, 3, SamplingParams(), 5), ("pen", 4, 5, pen, 3)],
        prefills=[prefill("pen2", [6, 6, 2, 6], pen, prompt_len=2)],
    )
    sampler = Sampler("cpu", 8)
    sampler.history.write("pen", 0, [1, 2, 3, 5])  # what earlier steps fed this worker
    tokens = sampler.sample(logits, inp)
    assert torch.equal(logits[0], raw[0])
    want_pen = expected(raw[1], [1, 2, 3], [5, 5], frequency=1.5, repetition=1.2)
    want_pen2 = expected(raw[2], [6, 6], [2, 6], frequency=1.5, repetition=1.2)
    assert torch.allclose(logits[1], want_pen) and torch.allclose(logits[2], want_pen2)
    assert tokens == [int(raw[0].argmax()), int(want_pen.argmax()), int(want_pen2.argmax())]


def test_a_recompute_on_another_worker_penalizes_exactly_as_the_first_one_did():
    """Worker A fed the prompt in two chunks, then decodes; worker B gets the recompute (prompt
    + outputs from position 0): both see the same history, so the same penalized logits."""
    sp = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5)
    a = Sampler("cpu", 8)
    a.sample(torch.zeros(0, VOCAB), step([prefill("r", [1, 2, 3], sp, 5, sample=False)]))
    a.sample(BASE.clone()[None], step([prefill("r", [4, 1], sp, 5, start=3)]))
    a.sample(BASE.clone()[None], step(decodes=[("r", 5, 6, sp, 5)]))
    on_a = BASE.clone()[None]
    a.sample(on_a, step(decodes=[("r", 6, 6, sp, 5)]))
    on_b = BASE.clone()[None]
    Sampler("cpu", 8).sample(on_b, step([prefill("r", [1, 2, 3, 4, 1, 6, 6], sp, 5)]))
    assert torch.equal(on_a, on_b)
    assert torch.allclose(on_a[0], expected(BASE, [1, 2, 3, 4, 1], [6, 6], 0.5, 0.25, 1.5))


def test_a_lost_history_fails_only_that_row():
    pen = SamplingParams(frequency_penalty=1.0)
    inp = step(decodes=[("ok", 3, 1, SamplingParams(), 2), ("lost", 7, 1, pen, 4)])
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RowErrors) as e:
        Sampler("cpu", 8).sample(logits, inp)
    assert (
        list(e.value.errors) == ["lost"] and "lost the request's tokens" in e.value.errors["lost"]
    )
    assert e.value.tokens == [int(logits[0].argmax()), None]


def test_token_history_follows_positions_and_drops_a_gap():
    h = TokenHistory(max_requests=2)
    h.write("a", 0, [1, 2, 3])
    h.write("a", 3, [4])
    assert h.tokens("a", 4).tolist() == [1, 2, 3, 4]
    h.write("a", 2, [9])  # a retried step writes a position again
    assert h.tokens("a", 3).tolist() == [1, 2, 9] and h.tokens("a", 4) is None
    h.write("a", 5, [7])  # past the end: cannot be rebuilt here
    assert h.tokens("a", 3) is None and len(h) == 0
    for rid in "xyz":
        h.write(rid, 0, [1])
    assert h.tokens("x", 1) is None and h.tokens("z", 1).tolist() == [1]  # LRU, 2 kept


def test_min_tokens_masks_eos_and_stop_ids_then_stops_masking():
    logits_row = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0])  # EOS, then stop id 6
    sp = SamplingParams(min_tokens=2, stop_token_ids=(6,))
    sampler = Sampler("cpu", 8, eos_ids=(EOS,))
    plans = [
        step([prefill("m", [1, 2], sp, prompt_len=2)]),  # 0 generated
        step(decodes=[("m", 2, 5, sp, 2)]),  # 1 generated
        step(decodes=[("m", 3, 5, sp, 2)]),  # 2 generated: no more masking
    ]
    got = [sampler.sample(logits_row.clone()[None], inp)[0] for inp in plans]
    assert got == [5, 5, EOS]
    keep_eos = SamplingParams(min_tokens=2, stop_token_ids=(6,), ignore_eos=True)
    first = sampler.sample(logits_row.clone()[None], step([prefill("n", [1], keep_eos, 1)]))
    assert first == [EOS]  # ignore_eos: EOS does not stop, so it is not masked
    sampled = SamplingParams(min_tokens=3, temperature=1.0, seed=4, stop_token_ids=(6,))
    draws = [
        sampler.sample(logits_row.clone()[None], step([prefill(f"s{i}", [1], sampled, 1)]))[0]
        for i in range(20)
    ]
    assert EOS not in draws and 6 not in draws


def test_logprobs_are_the_raw_log_softmax_and_top_n_the_n_largest_sorted():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 50, generator=g) * 3
    raw = torch.log_softmax(logits.clone(), -1)
    rows = [
        ("five", SamplingParams(logprobs=5)),
        ("none", SamplingParams()),
        ("zero", SamplingParams(logprobs=0, temperature=0.8, seed=2)),
        ("penalized", SamplingParams(logprobs=20, repetition_penalty=3.0)),
    ]
    inp = step(decodes=[(rid, 3, 7, sp, 2) for rid, sp in rows])
    sampler = Sampler("cpu", 8)
    sampler.history.write("penalized", 0, [7, 8, 9])
    tokens, logprobs = sampler.sample_step(logits, inp)
    assert logprobs[1] is None and len(logprobs) == 4
    for i, n in ((0, 5), (2, 0), (3, 20)):
        lp = logprobs[i]
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(float(raw[i, tokens[i]]), abs=1e-6)
        assert len(lp.top) == n
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(sorted(raw[i].tolist(), reverse=True)[:n], abs=1e-6)
        assert all(v == pytest.approx(float(raw[i, t]), abs=1e-6) for t, v in lp.top)
    # Greedy without penalties: the sampled token is the most likely one.
    assert logprobs[0].top[0][0] == tokens[0]
    assert logprobs[0].logprob == pytest.approx(float(raw[0].max()))


def test_the_plain_greedy_path_does_no_extra_work():
    inp = step(decodes=[(f"r{i}", 3, 1, SamplingParams(max_tokens=9), 2) for i in range(4)])
    assert inp.prompt_lens is None and inp.history_rows is None
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    sampler = Sampler("cpu", 8)
    tokens, logprobs = sampler.sample_step(logits, inp)
    assert tokens == logits.argmax(-1).tolist() and logprobs == () and len(sampler.history) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_logits_are_processed_as_cpu_ones():
    sp = SamplingParams(
        logprobs=3, frequency_penalty=0.5, repetition_penalty=1.5, min_tokens=9, max_tokens=9
    )
    inp = step([prefill("c", [1, 2, 3, 3, 7], sp, prompt_len=2)])
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(5))
    on_cpu = logits.clone()
    on_gpu = logits.cuda()
    cpu = Sampler("cpu", 8, eos_ids=(EOS,)).sample_step(on_cpu, inp)
    gpu = Sampler("cuda", 8, eos_ids=(EOS,)).sample_step(on_gpu, inp)
    assert gpu.tokens == cpu.tokens and torch.allclose(on_gpu.cpu(), on_cpu)
    assert gpu.logprobs[0].token_id == cpu.logprobs[0].token_id
    assert gpu.logprobs[0].logprob == pytest.approx(cpu.logprobs[0].logprob, abs=1e-5)
