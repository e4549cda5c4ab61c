"""OpenAI's sampling extras over HTTP with the official client, on a real tiny-model worker:
`logprobs` / `top_logprobs` (chat and completions, streamed and whole), the presence and
frequency penalties, vLLM's `min_tokens`. The values themselves are checked against the
model in test_live_logprobs.py; here, what a client sees."""

from __future__ import annotations

import pytest
from test_live_api import reference
from test_live_http import http  # noqa: F401  (the fixture)

openai = pytest.importorskip("openai")

N = 12
CHAT = [{"role": "user", "content": "Tell me about rivers."}]


def _chat(client, **kw):
    kw = {"model": "tiny", "messages": CHAT, "max_tokens": N, "temperature": 0, **kw}
    return client.chat.completions.create(extra_body={"ignore_eos": True}, **kw)


def test_chat_logprobs_whole_and_streamed_agree(http):  # noqa: F811
    client, *_ = http()
    whole = _chat(client, logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == N
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry.logprob == pytest.approx(tops[0])  # greedy: the most likely token
        assert entry.token == entry.top_logprobs[0].token
        assert entry.bytes == list(entry.token.encode())
    chunks = list(_chat(client, logprobs=True, top_logprobs=3, stream=True))
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_logprobs_only_when_asked(http):  # noqa: F811
    client, *_ = http()
    assert _chat(client).choices[0].logprobs is None
    assert _chat(client, logprobs=True).choices[0].logprobs.content[0].top_logprobs == []
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


def test_completion_logprobs_in_the_legacy_shape(http):  # noqa: F811
    client, *_ = http()
    r = client.completions.create(
        model="tiny",
        prompt=[9, 33, 70, 101],
        max_tokens=N,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == N
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == pytest.approx(value) == pytest.approx(max(top.values()))
        assert 1 <= len(top) <= 2  # the top 2, the greedy token among them


def test_a_frequency_penalty_changes_a_repeating_answer(http):  # noqa: F811
    client, *_ = http()
    plain = _chat(client, max_tokens=24, logprobs=True)
    tokens = [e.token for e in plain.choices[0].logprobs.content]
    assert len(set(tokens)) < len(tokens), "precondition: the greedy answer repeats a token"
    penalized = _chat(client, max_tokens=24, frequency_penalty=2.0, logprobs=True)
    assert [e.token for e in penalized.choices[0].logprobs.content] != tokens
    assert _chat(client, max_tokens=24).choices[0].message.content == (
        plain.choices[0].message.content
    )  # a neutral request after the penalized one is unchanged: no state leaks


def test_min_tokens_holds_back_a_stop_token(http, model_dir):  # noqa: F811
    client, *_ = http()
    prompt = [9, 33, 70, 101]
    first = reference(model_dir, prompt, 1)[0]  # the greedy first token: made a stop id

    def complete(**extra):
        return client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=N,
            temperature=0,
            extra_body={"ignore_eos": True, "stop_token_ids": [first], **extra},
        )

    stopped = complete()
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    held = complete(min_tokens=5)
    assert held.usage.completion_tokens >= 5
