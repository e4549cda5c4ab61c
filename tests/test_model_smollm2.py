"""The worker on the real default model (SmolLM2-135M-Instruct, converted from its GGUF): greedy
output through ModelBackend (paged KV, fused layers) equals transformers' greedy `generate`
token for token, in fp32, one request at a time and all three batched together.

Needs the converted model (`make model`, ~100 MB download, ~30 s); skipped without it. The
test never downloads: `make test-model` fetches, then runs this file.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ecoserve_common.models import DEFAULT_MODEL, ModelMissing, resolve  # noqa: E402
from ecoserve_worker.backends import ModelBackend  # noqa: E402
from ecoserve_worker.model_runner import ModelRunner, inputs_from_rows  # noqa: E402

N_NEW = 16
BLOCK = 16
QUESTIONS = [
    "What is the capital of France?",
    "Explain in one sentence what a KV cache is.",
    "List three fruits.",
]


@pytest.fixture(scope="module")
def model_dir():
    try:
        return resolve(DEFAULT_MODEL)
    except ModelMissing as exc:
        pytest.skip(f"{DEFAULT_MODEL} is not converted on this machine ({exc}); `make test-model`")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
            )
        )
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    """transformers' greedy continuations (up to N_NEW tokens, stopping at EOS), fp32."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    refs = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=N_NEW, do_sample=False)
        refs.append(out[0, len(p) :].tolist())
    return refs


@pytest.fixture(scope="module")
def backend(model_dir):
    runner = ModelRunner(model_dir, "cpu", torch.float32, num_blocks=64, block_size=BLOCK)
    return ModelBackend(runner, token_budget=512)


def run_batch(backend, prompts, eos):
    """All prompts prefill in one step, then decode together until each has N_NEW tokens or
    its EOS; every step goes through ModelBackend.execute (greedy rows)."""
    per = 64 // len(prompts)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(len(prompts))]
    outs: list[list[int]] = [[] for _ in prompts]
    rows = [(f"r{i}", p, 0, tables[i]) for i, p in enumerate(prompts)]
    while rows:
        result = backend.execute(inputs_from_rows(rows))
        assert result.error is None, result.error
        who = [int(r[0][1:]) for r in rows]
        for i, tok in zip(who, result.tokens, strict=True):
            outs[i].append(tok)
        rows = [
            (f"r{i}", [outs[i][-1]], len(prompts[i]) + len(outs[i]) - 1, tables[i])
            for i in who
            if len(outs[i]) < N_NEW and outs[i][-1] != eos
        ]
    return outs


def test_converted_model_answers_paris(tokenizer, reference):
    assert "Paris" in tokenizer.decode(reference[0], skip_special_tokens=True)


@pytest.mark.parametrize("i", range(len(QUESTIONS)))
def test_one_request_matches_transformers(backend, prompts, reference, tokenizer, i):
    assert run_batch(backend, [prompts[i]], tokenizer.eos_token_id) == [reference[i]]


def test_batched_requests_match_transformers(backend, prompts, reference, tokenizer):
    assert run_batch(backend, prompts, tokenizer.eos_token_id) == reference
