"""The OpenAI-compatible HTTP API, driven by the official `openai` client, over a LiveEngine
with real worker processes (tiny model, CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")

from conftest import free_port  # noqa: E402
from test_live_api import reference  # noqa: E402
from test_live_engine import start_worker, wait_for  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from ecoserve_common.pb import scheduler_pb2 as pb  # noqa: E402
from ecoserve_common.pb import scheduler_pb2_grpc as pb_grpc  # noqa: E402
from ecoserve_scheduler.core import SchedulerCore, make_policy  # noqa: E402
from ecoserve_scheduler.live import LiveEngine  # noqa: E402
from ecoserve_scheduler.live.api import SchedulerService, build_server  # noqa: E402
from ecoserve_scheduler.live.frontend import ApiLimits, Frontend  # noqa: E402
from ecoserve_scheduler.live.http_api import create_app  # noqa: E402
from ecoserve_scheduler.store import RequestStore, create_schema, make_engine  # noqa: E402

N = 8


class Served(NamedTuple):
    client: openai.OpenAI
    base: str
    engine: LiveEngine
    frontend: Frontend


@pytest.fixture
def http(model_dir, tmp_path):
    made = []

    def start(workers=("w0",), max_pending: int = 1024, store: bool = False) -> Served:
        engine = LiveEngine(SchedulerCore(make_policy("vllm")), auth_token="k").start()
        procs = [start_worker(engine.address, w, model_dir) for w in workers]
        wait_for(lambda: len(engine.worker_ids()) == len(workers))
        tok = AutoTokenizer.from_pretrained(model_dir)
        limits = ApiLimits(
            max_model_len=2048,
            max_pending=max_pending,
            vocab_size=512,
            queue_without_workers=not workers,  # no worker: requests wait, for these tests
        )
        rows = None
        if store:
            db = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
            create_schema(db)
            rows = RequestStore(db)
        frontend = Frontend(engine, tok, rows, limits)
        app = create_app(frontend, "tiny")
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started)
        made.append((engine, procs, server, thread))
        base = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        return Served(client, base, engine, frontend)

    yield start
    for engine, procs, server, thread in made:
        server.should_exit = True
        thread.join(10)
        for p in procs:
            p.kill()
            p.wait()
        engine.stop()


def test_completions_match_reference_under_concurrency(http, model_dir):
    client, *_ = http(workers=("w0", "w1"))
    prompts = [[9 + i, 33, 70 + 2 * i, 101] for i in range(10)]
    refs = [reference(model_dir, p, N) for p in prompts]

    def one(i: int):
        r = client.completions.create(
            model="tiny",
            prompt=prompts[i % 10],
            max_tokens=N,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return i, r

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    tok = AutoTokenizer.from_pretrained(model_dir)
    for i, r in results:
        assert r.choices[0].finish_reason == "length"
        assert r.choices[0].text == tok.decode(refs[i % 10])
        assert r.usage.completion_tokens == N and r.usage.prompt_tokens == 4


def test_chat_streaming_equals_non_streaming(http):
    client, *_ = http()
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me about rivers."}],
        max_tokens=N,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        whole.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert whole.choices[0].finish_reason == "length"


def test_models_health_metrics(http):
    client, base, *_ = http()
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(base + "/health").json()["workers"] == ["w0"]
    client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
    wait_for(lambda: "ecoserve_kv_blocks" in httpx.get(base + "/metrics").text)
    text = httpx.get(base + "/metrics").text
    assert (
        "ecoserve_requests_total{finish_reason=" in text and "ecoserve_ttft_seconds_bucket" in text
    )


def test_bad_input_and_over_capacity(http):
    client, base, engine, _ = http(workers=(), max_pending=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be > 0"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="empty prompt"):
        client.completions.create(model="tiny", prompt="  ", max_tokens=3)
    garbage = httpx.post(
        base + "/v1/completions",
        content=b"\x00\xffnot json",
        headers={"content-type": "application/json"},
    )
    assert garbage.status_code == 400 and "error" in garbage.json()

    def wait_forever() -> None:
        with contextlib.suppress(httpx.ReadTimeout):  # nothing can serve it
            httpx.post(base + "/v1/completions", timeout=5, json={"prompt": "w", "max_tokens": 3})

    held = threading.Thread(target=wait_forever, daemon=True)
    held.start()  # no worker: it stays pending
    wait_for(lambda: engine.pending == 1)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt="one more", max_tokens=3)
    assert e.value.response.headers["retry-after"] == "1"
    assert httpx.get(base + "/health").status_code == 503  # up, but no workers


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_its_request(http, stream):
    _, base, engine, _ = http(workers=())  # no worker: only an abort can end the request
    body = {"prompt": "wait", "max_tokens": 3, "stream": stream}
    with contextlib.suppress(httpx.ReadTimeout), httpx.Client(timeout=1) as c:
        c.post(base + "/v1/completions", json=body)  # the client gives up and hangs up
    wait_for(lambda: engine.pending == 0)
    assert httpx.get(base + "/health").status_code == 503  # the server is still up


def test_api_key_on_v1_routes(model_dir):
    from fastapi.testclient import TestClient

    engine = LiveEngine(SchedulerCore(make_policy("vllm")))  # not started: no request runs
    tok = AutoTokenizer.from_pretrained(model_dir)
    app = create_app(Frontend(engine, tok), "tiny", api_key="s3cret")
    with TestClient(app) as c:
        denied = c.get("/v1/models")
        assert denied.status_code == 401 and "API key" in denied.json()["error"]["message"]
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"
        assert c.get("/health").status_code == 503  # open without the key (and no workers)
        assert c.get("/stats").json()["pending"] == 0  # open too, as /metrics is
        key = {"Authorization": "Bearer s3cret"}
        bad = c.post("/v1/completions", json={"prompt": "hi", "top_p": "x"}, headers=key)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"
    engine.stop()


@pytest.mark.parametrize(
    ("field", "value"), [("seed", -1), ("seed", 2**64), ("top_k", 2**32), ("temperature", -0.5)]
)
def test_bad_sampling_is_a_400_naming_the_field_and_serving_goes_on(http, field, value):
    client, base, *_ = http()
    body = {"prompt": "hi", "max_tokens": 3, field: value}
    bad = httpx.post(base + "/v1/completions", json=body, timeout=30)
    assert bad.status_code == 400
    err = bad.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", field, None)
    assert field in err["message"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, field: value}
    bad_chat = httpx.post(base + "/v1/chat/completions", json=chat, timeout=30)
    assert bad_chat.status_code == 400 and bad_chat.json()["error"]["param"] == field
    with pytest.raises(openai.BadRequestError):  # the official client sees a 400 too
        client.completions.create(
            model="tiny", prompt="hi", max_tokens=3, extra_body={field: value}
        )
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_response_id_is_the_request_id_in_the_store_and_over_grpc(http):
    """One id: the HTTP response's `id` is the store's key and what gRPC GetRequest takes."""
    client, _, _, frontend = http(store=True)
    done = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    chunks = list(
        client.completions.create(
            model="tiny", prompt="stream", max_tokens=4, temperature=0, stream=True
        )
    )
    assert done.id.startswith("cmpl-") and chat.id.startswith("chatcmpl-")
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    for rid, n in (
        (done.id, done.usage.completion_tokens),
        (chat.id, chat.usage.completion_tokens),
    ):
        wait_for(lambda rid=rid: frontend.store.get(rid).status == "finished")
        assert frontend.store.get(rid).response_tokens == n
    assert frontend.store.get(chunks[0].id) is not None
    server, port = build_server(SchedulerService(frontend), "127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = pb_grpc.SchedulerStub(channel).GetRequest(
                pb.GetRequestRequest(request_id=done.id), timeout=10
            )
        assert (info.request_id, info.status) == (done.id, "finished")
        assert info.response_tokens == done.usage.completion_tokens
    finally:
        server.stop(0).wait()


def test_a_model_other_than_the_served_one_is_openais_404(model_dir):
    from fastapi.testclient import TestClient

    engine = LiveEngine(SchedulerCore(make_policy("vllm")))  # not started: nothing runs
    app = create_app(Frontend(engine, AutoTokenizer.from_pretrained(model_dir)), "tiny")
    want = {
        "message": "The model `gpt-4o` does not exist.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as c:
        for path, body in (
            ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}),
            ("/v1/chat/completions", chat),
        ):
            r = c.post(path, json=body)
            assert r.status_code == 404 and r.json() == {"error": want}
        too_many = c.post("/v1/completions", json={"prompt": "hi", "stop": list("abcde")})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "stop"
    engine.stop()


def _stop_inside(text: str) -> str:
    """A stop string from the middle of `text`: 3 printable characters whose first occurrence
    is past the first few characters (so some text comes before it)."""
    for i in range(4, len(text) - 3):
        s = text[i : i + 3]
        if s.isprintable() and "\ufffd" not in s and text.index(s) == i:
            return s
    pytest.skip(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_text_across_tokens_and_abort_the_request(http, stream):
    client, _, engine, frontend = http(store=True)
    kw = dict(model="tiny", prompt="Tell me about rivers.", temperature=0, max_tokens=24)
    full = client.completions.create(**kw, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = _stop_inside(text)
    r = client.completions.create(
        **kw, stop=["never-there", stop], stream=stream, extra_body={"ignore_eos": True}
    )
    if stream:
        chunks = list(r)
        got = "".join(c.choices[0].text for c in chunks)
        last, rid = chunks[-1], chunks[0].id
        n = last.usage.completion_tokens if last.usage else None
    else:
        got, last, rid, n = r.choices[0].text, r, r.id, r.usage.completion_tokens
    assert got == text[: text.index(stop)]
    assert last.choices[0].finish_reason == "stop"
    assert n is None or n < 24
    wait_for(lambda: frontend.store.get(rid).status == "finished")
    wait_for(lambda: engine.pending == 0)  # aborted in the engine: nothing left running
    # chat takes `stop` too (a single string)
    msgs = [{"role": "user", "content": "Tell me about rivers."}]
    whole = (
        client.chat.completions.create(
            model="tiny",
            messages=msgs,
            temperature=0,
            max_tokens=24,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .message.content
    )
    cut = _stop_inside(whole)
    chat = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        temperature=0,
        max_tokens=24,
        stop=cut,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.content == whole[: whole.index(cut)]
    assert chat.choices[0].finish_reason == "stop"


def test_n_choices_with_a_seed_are_different_samples_that_the_seed_reproduces(http):
    client, *_ = http()
    kw = dict(model="tiny", prompt="Tell me about rivers.", max_tokens=N, temperature=1.0)
    kw["extra_body"] = {"ignore_eos": True}
    r = client.completions.create(n=3, seed=7, **kw)
    texts = [c.text for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert r.usage.completion_tokens == 3 * N
    one = client.completions.create(n=1, seed=7, **kw)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    # choice i samples with seed + i: the same request gives the same choices
    assert [client.completions.create(n=1, seed=7 + i, **kw).choices[0].text for i in range(3)] == (
        texts
    )
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(n=3, seed=7, stream=True, **kw):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert list(streamed.values()) == texts


def test_chat_as_guidellm_and_the_sdk_send_it(http):
    """Content parts, developer and assistant turns, include_usage: guidellm's chat body."""
    client, base, *_ = http()
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Tell me about rivers."}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "And lakes?"}]},
    ]
    kw = dict(model="tiny", messages=messages, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(max_completion_tokens=N, **kw)
    assert whole.usage.completion_tokens == N and whole.choices[0].finish_reason == "length"
    chunks = list(
        client.chat.completions.create(
            max_completion_tokens=N, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    *chunks, last = chunks
    assert last.choices == [] and last.usage == whole.usage
    assert [c.choices[0].delta.role for c in chunks][:2] == ["assistant", None]
    assert "".join(c.choices[0].delta.content for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    body = {  # what guidellm posts, byte for byte in its fields
        "model": "tiny",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": N,
        "max_completion_tokens": N,
        "stop": None,
        "ignore_eos": True,
    }
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == N
    assert client.models.retrieve("tiny").id == "tiny"
