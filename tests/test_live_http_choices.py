"""Streaming exactly as OpenAI streams (the role once, usage only when asked, the finish on
the chunk that ends a choice, multi-byte characters whole) and n choices (indexed, one
tokenized prompt, usage summed, admission and aborts counting all n), driven by the official
`openai` client in-process over fake engines."""

from __future__ import annotations

import json
import socket
import threading

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from http_fakes import USER, DrippingEngine, serve_fakes, sse  # noqa: E402
from security.test_edge_http import (  # noqa: E402
    FakeEngine,
    make_frontend,
    raw_request,
    served,
    wait_for,
)

from ecoserve_scheduler.live.http_api import create_app  # noqa: E402


@pytest.fixture
def api():
    yield from serve_fakes()


# ---- streaming as OpenAI streams ---------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("usage", [False, True])
def test_a_stream_has_the_role_once_and_usage_only_when_asked(api, chat, usage):
    client, raw, *_ = api(engine=DrippingEngine())
    body = {"max_tokens": 4, "stream": True, "prompt": "hey"}
    if chat:
        body = {**body, "messages": USER}
        del body["prompt"]
    if usage:
        body["stream_options"] = {"include_usage": True}
    r = raw.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
    events = sse(r.text)
    if usage:
        *events, last = events
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
        assert last["usage"]["prompt_tokens"] == (len("user: hi\nassistant:") if chat else 3)
        assert all("usage" in e and e["usage"] is None for e in events)
    else:
        assert all("usage" not in e for e in events)
    # a chunk per token (each came alone), then the finish, which came alone too
    assert len(events) == 5 and all(len(e["choices"]) == 1 for e in events)
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * 4 + ["length"]
    if chat:
        deltas = [e["choices"][0]["delta"] for e in events]
        assert deltas[0] == {"role": "assistant", "content": "E"}
        assert deltas[1:] == [{"content": "E"}] * 3 + [{"content": ""}]
    else:
        assert [e["choices"][0]["text"] for e in events] == ["E"] * 4 + [""]
    # what the openai client makes of it
    if chat:
        kw = dict(stream_options={"include_usage": True}) if usage else {}
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=USER, max_tokens=4, stream=True, **kw
            )
        )
        if usage:
            *chunks, last = chunks
            assert last.choices == [] and last.usage.completion_tokens == 4
        assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
        assert "".join(c.choices[0].delta.content for c in chunks) == "EEEE"
        assert [c.choices[0].delta.role for c in chunks] == ["assistant"] + [None] * 4
        assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("include_usage", [False, True])
def test_continuous_usage_stats_puts_usage_on_every_chunk_with_include_usage(api, include_usage):
    """vLLM's stream option (guidellm sends it): with include_usage, every chunk carries its
    choice's usage so far; without include_usage it changes nothing, as in vLLM."""
    _, raw, *_ = api(engine=DrippingEngine())
    options = {"include_usage": include_usage, "continuous_usage_stats": True}
    body = {"prompt": "hey", "max_tokens": 3, "stream": True, "stream_options": options}
    events = sse(raw.post("/v1/completions", json=body).text)
    if not include_usage:
        assert all("usage" not in e for e in events)
        return
    *events, last = events
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 3, 3]
    assert all(e["usage"]["prompt_tokens"] == 3 for e in events)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("chat", [False, True])
def test_text_and_finish_that_arrive_together_are_one_chunk(api, chat):
    """An engine that has every token and the finish queued before the stream reads (the
    plain FakeEngine): one chunk carries all the text and the finish_reason."""
    _, raw, *_ = api()
    body = {"max_tokens": 3, "stream": True}
    body |= {"messages": USER} if chat else {"prompt": "hey"}
    (event,) = sse(raw.post("/v1/chat/completions" if chat else "/v1/completions", json=body).text)
    (choice,) = event["choices"]
    assert choice["finish_reason"] == "length"
    if chat:
        assert choice["delta"] == {"role": "assistant", "content": "EEE"}
    else:
        assert choice["text"] == "EEE"


def test_a_whole_response_always_carries_usage(api):
    client, *_ = api()
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert r.usage.completion_tokens == 3 and r.usage.total_tokens == r.usage.prompt_tokens + 3
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=2)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 2)


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_text_equals_whole_text_with_multibyte_characters(api, model_dir, chat):
    """A real byte-level BPE tokenizer, its tokens one per drain: an emoji or a CJK character
    split across tokens arrives whole, and the streamed text is the whole response's."""
    from ecoserve_scheduler.live.tokenizer import ModelTokenizer

    tok = ModelTokenizer(model_dir)
    text = "Rivers: ünïcödé 🙂 河流 🌊 and more."
    script = tok.encode(text)[1:]  # no BOS
    assert tok.decode(script) == text and len(script) > len(text.split())
    client, *_ = api(engine=DrippingEngine(script), tokenizer=tok)
    kw = dict(model="tiny", max_tokens=len(script))
    if chat:
        whole = client.chat.completions.create(messages=USER, **kw).choices[0].message.content
        chunks = [
            c.choices[0].delta.content
            for c in client.chat.completions.create(messages=USER, stream=True, **kw)
        ]
    else:
        whole = client.completions.create(prompt="hi", **kw).choices[0].text
        chunks = [
            c.choices[0].text for c in client.completions.create(prompt="hi", stream=True, **kw)
        ]
    assert whole == text and "".join(chunks) == text
    assert len(chunks) > 5 and not any("\ufffd" in c for c in chunks)


# ---- n choices ---------------------------------------------------------------------------------


def test_n_choices_share_one_tokenized_prompt_and_sum_their_usage(api):
    client, _, engine, tok, _ = api()
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=3, n=3, seed=41)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.text == "EEE" and c.finish_reason == "length" for c in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 9)
    reqs = engine.submitted
    assert [q.request_id for q in reqs] == [r.id, f"{r.id}-1", f"{r.id}-2"]
    assert [q.sampling.seed for q in reqs] == [41, 42, 43]  # n different samples
    assert len({q.prompt_token_ids for q in reqs}) == 1 and tok.texts == ["hello"]  # once
    chat = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, n=2)
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 4
    assert [q.sampling.seed for q in engine.submitted[3:]] == [None, None]


def test_n_streamed_choices_carry_their_index(api):
    client, raw, *_ = api(engine=DrippingEngine())
    body = {"messages": USER, "max_tokens": 3, "n": 2, "stream": True}
    events = sse(
        raw.post(
            "/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}
        ).text
    )
    *events, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    for i in (0, 1):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert [c["delta"] for c in mine] == [
            {"role": "assistant", "content": "E"},
            {"content": "E"},
            {"content": "E"},
            {"content": ""},
        ]
        assert [c["finish_reason"] for c in mine] == [None, None, None, "length"]
    texts = {0: "", 1: ""}
    for c in client.chat.completions.create(
        model="tiny", messages=USER, max_tokens=3, n=2, stream=True
    ):
        texts[c.choices[0].index] += c.choices[0].delta.content
    assert texts == {0: "EEE", 1: "EEE"}


def test_admission_counts_all_n_choices(api):
    client, _, engine, _, frontend = api(max_pending=2)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=1, n=3)
    assert engine.submitted == [] and frontend._starting == 0  # every place given back
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=1, n=2)
    assert len(r.choices) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_aborts_all_n_choices(stream):
    engine = FakeEngine(hold=True)
    app = create_app(make_frontend(engine), "tiny")
    with served(app) as base:
        port = int(base.rsplit(":", 1)[1])
        s = raw_request(port, {"prompt": "wait", "max_tokens": 5, "n": 3, "stream": stream})
        wait_for(lambda: engine.pending == 3)
        rids = list(engine.handles)
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        wait_for(lambda: engine.pending == 0)
        assert sorted(engine.cancelled) == sorted(rids)


@pytest.mark.parametrize("stream", [False, True])
def test_a_choice_that_fails_fails_the_request_and_aborts_the_others(stream):
    engine = FakeEngine(hold=True)
    app = create_app(make_frontend(engine), "tiny")
    why = "failed: sampling: non-finite logits"
    got: list = []
    body = {"prompt": "p", "max_tokens": 3, "n": 2, "stream": stream}
    with TestClient(app) as c:

        def call() -> None:
            with c.stream("POST", "/v1/completions", json=body) as r:
                got.append((r.status_code, r.read().decode()))

        t = threading.Thread(target=call)
        t.start()
        wait_for(lambda: engine.pending == 2)
        first, second = engine.handles
        engine.tokens(first, 1)
        engine.finish(first, why)
        t.join(10)
    ((status, text),) = got
    if stream:
        events = sse(text)
        assert status == 200 and events[-2]["choices"][0]["finish_reason"] == "error"
        assert events[-1]["error"]["message"] == why
    else:
        assert status == 500 and json.loads(text)["error"]["message"] == why
    assert engine.cancelled == [second] and engine.pending == 0


def test_a_choice_that_cannot_start_aborts_the_ones_that_did():
    class SecondFails(FakeEngine):
        def submit(self, request):
            if self.submitted:
                raise RuntimeError("engine gone")
            return super().submit(request)

    engine = SecondFails(hold=True)
    app = create_app(make_frontend(engine), "tiny")
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"prompt": "p", "max_tokens": 3, "n": 2})
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error"
    assert engine.cancelled == [engine.submitted[0].request_id] and engine.pending == 0
