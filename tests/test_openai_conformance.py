"""What real OpenAI-API clients send, replayed against the HTTP API: the request bodies and
headers guidellm (chat and text completions, streaming or not, and its start-up GETs) and
LiteLLM (`completion`, `text_completion`) were recorded sending (tests/fixtures/openai_shapes/,
see its README; committed JSON, so neither client is needed here). Each body goes, with its
`model` rewritten to the served id and the recorded bearer key replaced by the server's, to an
app over a LiveEngine with one real worker on the tiny model, and must come back 200 with a
well-formed OpenAI response: for a stream, server-sent events of well-formed chunks ending in
`data: [DONE]`, one finish reason, and usage on a last, choice-less chunk exactly when
`stream_options.include_usage` asked for it."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("torch")

from conftest import free_port  # noqa: E402
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from test_live_engine import start_worker, wait_for  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from ecoserve_scheduler.core import SchedulerCore, make_policy  # noqa: E402
from ecoserve_scheduler.live import LiveEngine  # noqa: E402
from ecoserve_scheduler.live.frontend import ApiLimits, Frontend  # noqa: E402
from ecoserve_scheduler.live.http_api import create_app, uvicorn_config  # noqa: E402

SHAPES = Path(__file__).resolve().parent / "fixtures" / "openai_shapes"
SERVED = "tiny"  # the served model id: what every recorded `model` becomes
KEY = "conformance-key"  # the server's API key: what every recorded "<redacted>" becomes


def _load(name: str) -> dict[str, Any]:
    return json.loads((SHAPES / f"{name}.json").read_text())


ALL = sorted(p.stem for p in SHAPES.glob("*.json"))
POSTS = [name for name in ALL if _load(name).get("method") == "POST"]


class Served(NamedTuple):
    base: str
    engine: LiveEngine


@pytest.fixture(scope="module")
def served(model_dir) -> Iterator[Served]:
    """The HTTP API with an API key, as `ecoserve up` serves it (uvicorn_config), over a
    LiveEngine with one worker process on the tiny model."""
    engine = LiveEngine(SchedulerCore(make_policy("vllm")), auth_token="k").start()
    worker = start_worker(engine.address, "w0", model_dir)
    try:
        wait_for(lambda: engine.worker_ids() == ["w0"])
        limits = ApiLimits(max_model_len=2048, vocab_size=512)
        frontend = Frontend(engine, AutoTokenizer.from_pretrained(model_dir), None, limits)
        app = create_app(frontend, SERVED, api_key=KEY)
        port = free_port()
        server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started)
        try:
            yield Served(f"http://127.0.0.1:{port}", engine)
        finally:
            server.should_exit = True
            thread.join(10)
    finally:
        worker.kill()
        worker.wait()
        engine.stop()


def replayed(shape: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any] | None]:
    """The recorded headers (our key where the client's was) and body (our model id)."""
    headers = {k: v.replace("<redacted>", KEY) for k, v in shape["headers"].items()}
    body = shape.get("body")
    if isinstance(body, dict) and "model" in body:
        body = {**body, "model": SERVED}
    return headers, body


def cap_of(body: dict[str, Any]) -> int | None:
    cap = body.get("max_completion_tokens")
    return body.get("max_tokens") if cap is None else cap


def check_usage(usage: dict[str, Any], body: dict[str, Any]) -> None:
    """A whole request's usage: prompt tokens counted, the completion within its cap (all of
    it with ignore_eos), the total their sum."""
    assert usage["prompt_tokens"] > 0
    cap = cap_of(body)
    if body.get("ignore_eos") and cap is not None:
        assert usage["completion_tokens"] == cap
    elif cap is not None:
        assert 0 <= usage["completion_tokens"] <= cap
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_finish(reason: Any, body: dict[str, Any]) -> None:
    if body.get("ignore_eos") and cap_of(body) is not None:
        assert reason == "length"
    else:
        assert reason in ("stop", "length")


def check_whole(r: httpx.Response, body: dict[str, Any], chat: bool) -> None:
    assert r.headers["content-type"].startswith("application/json")
    data = r.json()
    kind = ChatCompletion if chat else Completion
    parsed = kind.model_validate(data)  # the official client's own response type
    assert parsed.object == ("chat.completion" if chat else "text_completion")
    assert parsed.model == SERVED and parsed.id and isinstance(data["created"], int)
    assert len(parsed.choices) == 1 and parsed.choices[0].index == 0
    choice = data["choices"][0]
    if chat:
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str)
    else:
        assert isinstance(choice["text"], str)
    check_finish(choice["finish_reason"], body)
    check_usage(data["usage"], body)


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order; every event must be a data line."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        for line in block.splitlines():
            if line.startswith(":"):  # an SSE comment (a keep-alive) is allowed
                continue
            assert line.startswith("data: "), f"not an SSE data line: {line!r}"
            events.append(line[len("data: ") :])
    return events


def check_stream(r: httpx.Response, body: dict[str, Any], chat: bool) -> None:
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events and events[-1] == "[DONE]", "the stream must end with data: [DONE]"
    assert "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks, "no chunk before [DONE]"
    assert not [c for c in chunks if "error" in c], f"error events: {chunks}"
    obj = "chat.completion.chunk" if chat else "text_completion"
    for c in chunks:
        if chat:  # the official client's chunk type (a text stream reuses Completion, whose
            ChatCompletionChunk.model_validate(c)  # finish_reason may not be null: not here)
        assert c["object"] == obj and c["model"] == SERVED
        assert isinstance(c["id"], str) and c["id"] and isinstance(c["created"], int)
        assert isinstance(c["choices"], list)
    assert len({c["id"] for c in chunks}) == 1, "one id for every chunk of a stream"

    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices, "no chunk carries a choice"
    for c in with_choices:
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert all(f is None for f in finishes[:-1]), f"finish_reason before the end: {finishes}"
    check_finish(finishes[-1], body)
    if chat:
        first = with_choices[0]["choices"][0]["delta"]
        assert first.get("role") == "assistant", "the first delta names the role"
        for c in with_choices:
            assert isinstance(c["choices"][0]["delta"].get("content") or "", str)
    else:
        assert all(isinstance(c["choices"][0]["text"], str) for c in with_choices)

    options = body.get("stream_options") or {}
    usages = [c for c in chunks if c.get("usage") is not None]
    if not options.get("include_usage"):
        assert not usages, "usage sent without stream_options.include_usage"
        return
    # OpenAI: one more chunk before [DONE], its `choices` empty, the whole request's usage.
    last = chunks[-1]
    assert last["choices"] == [] and last.get("usage") is not None, (
        "include_usage: the last chunk before [DONE] must carry usage and no choices"
    )
    check_usage(last["usage"], body)
    if not options.get("continuous_usage_stats"):  # vLLM's: usage on every chunk
        assert usages == [last], "usage on a chunk other than the last"


@pytest.mark.parametrize("name", POSTS)
def test_recorded_request_is_served(served, name):
    shape = _load(name)
    headers, body = replayed(shape)
    assert isinstance(body, dict)
    r = httpx.post(served.base + shape["path"], json=body, headers=headers, timeout=120)
    assert r.status_code == 200, f"{shape['client']} {shape['version']}: {r.text[:500]}"
    chat = shape["path"] == "/v1/chat/completions"
    if body.get("stream"):
        check_stream(r, body, chat)
    else:
        check_whole(r, body, chat)
    wait_for(lambda: served.engine.pending == 0)  # nothing left running in the engine


def test_guidellm_startup_calls(served):
    """guidellm's GETs before a run: /health must be 2xx (else it refuses to start) and
    /v1/models must list the served id first (it becomes every request's `model`)."""
    shape = _load("guidellm_startup")
    headers, _ = replayed(shape)
    for call in shape["requests"]:
        r = httpx.request(call["method"], served.base + call["path"], headers=headers)
        assert r.status_code == 200, f"{call}: {r.status_code} {r.text[:300]}"
        if call["path"] == "/v1/models":
            assert r.json()["data"][0]["id"] == SERVED


def test_every_fixture_is_described():
    """Each recorded shape names its client and version, and the README lists it."""
    readme = (SHAPES / "README.md").read_text()
    assert POSTS and "guidellm_startup" in ALL
    for name in ALL:
        shape = _load(name)
        assert shape["client"] in ("guidellm", "litellm") and shape["version"]
        assert f"`{name}.json`" in readme
        assert "sk-" not in json.dumps(shape), "a recorded key was not redacted"
