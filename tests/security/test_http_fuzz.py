"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): every
operation the app documents, with bodies that fit the schema and bodies that break it, sent
in-process (ASGI) to the FastAPI app over a fake engine and tokenizer. The property: no input
is a 5xx, and every 4xx is a JSON error in OpenAI's shape.

Derandomized (the same examples every run, so CI cannot flake) and bounded in examples per
operation so the whole module runs in well under two minutes.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from test_edge_http import FakeEngine, make_frontend  # noqa: E402

from ecoserve_scheduler.live.http_api import create_app  # noqa: E402

# A short context keeps every accepted request small: the fake engine writes max_tokens tokens.
APP = create_app(make_frontend(FakeEngine(), max_model_len=256), "tiny")
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_input_is_a_server_error_and_every_refusal_is_an_openai_error(case):
    response = case.call()
    assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
        assert err["type"] in ("invalid_request_error", "authentication_error", "rate_limit_error")
        assert set(err) == {"message", "type", "param", "code"}
