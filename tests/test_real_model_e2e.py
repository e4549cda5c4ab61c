"""The issue's "done when": with SmolLM2-135M-Instruct converted on this machine (`make model`),
the official `openai` client asks `ecoserve up` "What is the capital of France?" and the answer
is a sentence naming Paris. Skips, saying how to get the model, when it is not here."""

from __future__ import annotations

import subprocess

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("torch")

from conftest import free_port, start_up  # noqa: E402

from ecoserve_common.models import DEFAULT_MODEL, ModelMissing, resolve  # noqa: E402

try:
    MODEL_DIR = resolve(DEFAULT_MODEL)
except ModelMissing as exc:
    pytest.skip(
        f"{DEFAULT_MODEL} is not on this machine ({exc}); `make model` converts it once",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("up")
    http_port = free_port()
    args = ["--workers", "1", "--no-predictor", "--grpc-port", str(free_port())]
    args += ["--http-port", str(http_port), "--home", str(home), "--num-blocks", "128"]
    # fp32: SmolLM2's first answer token to this question is a 0.08-logit near-tie in fp32 that
    # bf16 (the default on CPUs with native bf16) resolves the other way ("L'Étoile, ...").
    args += ["--dtype", "float32"]
    proc, _ = start_up([*args, "--token-budget", "256"], 300, stderr=subprocess.STDOUT)
    try:
        yield openai.OpenAI(
            base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0
        )
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_capital_of_france_is_paris(stack):
    assert [m.id for m in stack.models.list()] == [DEFAULT_MODEL]
    r = stack.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=48,
        temperature=0,
    )
    answer = r.choices[0].message.content
    print(f"answer: {answer!r} ({r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens)")
    assert "Paris" in answer and len(answer.split()) >= 3, answer
    assert r.model == DEFAULT_MODEL
    assert r.choices[0].finish_reason == "stop"  # the model's end of turn, not the cap
    assert "<|im_end|>" not in answer  # the ending token adds no text


def test_streamed_answer_equals_the_whole_one_and_stop_strings_cut_it(stack):
    kw = dict(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=48,
        temperature=0,
    )
    whole = stack.chat.completions.create(**kw).choices[0].message.content
    chunks = list(stack.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    cut = stack.chat.completions.create(stop=["Paris"], **kw).choices[0]
    assert cut.message.content == whole[: whole.index("Paris")]
    assert cut.finish_reason == "stop"
    with pytest.raises(openai.NotFoundError):
        stack.chat.completions.create(**{**kw, "model": "gpt-4o"})
