"""What the HTTP API's in-process tests share (tests/test_live_http_openai.py,
tests/test_live_http_choices.py): fake engines and tokenizers, the app behind the official
`openai` client over ASGI, and an SSE parser."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import openai
from fastapi.testclient import TestClient
from security.test_edge_http import FakeEngine, FakeTokenizer, make_frontend

from ecoserve_scheduler.live.http_api import create_app

USER = [{"role": "user", "content": "hi"}]


class RecordingTokenizer(FakeTokenizer):
    """FakeTokenizer that keeps every text it encoded (the rendered prompts)."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.texts.append(text)
        return super().encode(text)


class DrippingEngine(FakeEngine):
    """Each request's tokens one at a time (`script`, else max_tokens of id 40), the next only
    once the reader drained the last: each token arrives in a drain of its own, so each one that
    adds text is a chunk of its own. Then "length"."""

    def __init__(self, script: list[int] | None = None) -> None:
        super().__init__(hold=True)
        self.script = script

    def submit(self, request):
        handle = super().submit(request)
        threading.Thread(target=self._drip, args=(request, handle), daemon=True).start()
        return handle

    def _drip(self, request, handle) -> None:
        rid = request.request_id
        for token in self.script or [40] * request.sampling.max_tokens:
            if not self._drained(handle, rid):
                return
            try:
                self.tokens(rid, 1, token)
            except KeyError:  # cancelled meanwhile
                return
        if self._drained(handle, rid):
            self.finish(rid, "length")

    def _drained(self, handle, rid: str) -> bool:
        deadline = time.monotonic() + 20
        while not handle.events.empty():
            if rid not in self.handles or time.monotonic() > deadline:
                return False
            time.sleep(0.001)  # a handshake with the reader, not a timing assumption
        return rid in self.handles


def serve_fakes() -> Iterator:
    """For a fixture to yield from: start(engine, tokenizer, **limits) -> (openai client, raw
    TestClient, engine, tokenizer, frontend) over an app on `engine` (a FakeEngine by
    default); every app is closed at the end."""
    made = []

    def start(engine=None, tokenizer=None, **limits):
        engine = engine or FakeEngine()
        tokenizer = tokenizer or RecordingTokenizer()
        frontend = make_frontend(engine, tokenizer, **limits)
        raw = TestClient(create_app(frontend, "tiny")).__enter__()
        made.append(raw)
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=raw, max_retries=0
        )
        return client, raw, engine, tokenizer, frontend

    yield start
    for raw in made:
        raw.__exit__(None, None, None)


def sse(text: str) -> list[dict]:
    """The JSON events of an SSE body (not [DONE]); asserts it ends with [DONE]."""
    assert text.rstrip().endswith("data: [DONE]")
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
