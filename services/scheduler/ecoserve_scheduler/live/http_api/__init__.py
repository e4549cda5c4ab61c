"""OpenAI-compatible HTTP API over the Frontend: /v1/completions, /v1/chat/completions
(streaming as server-sent events, or not), /v1/models, /health, Prometheus /metrics, /stats.

Layout: `schemas` (every request and response body), `completions` and `chat` (their routers),
`admin` (health, models, metrics, stats), `generation` (what the two generating routes share),
`streaming` (a request's text on the event loop, no thread per stream), `edge` (API key, body
size and time, error handlers), `server` (HttpLimits and the uvicorn Config: header timeouts),
`metrics` (Prometheus series), `app` (the factory that wires them).

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for bad
input (`param` names the field where one is at fault, e.g. "seed"), 401 without the API key,
404 `model_not_found` for a `model` other than the served one (an empty or omitted `model`
means the served one), 408 for a body too slow, 413 for a body too large, 429 with Retry-After
when over capacity, 500 `server_error` for a request that failed in the engine (with its
reason) or anything unexpected ("internal error"), 504 when the request's timeout passes.

`stop` (a string or up to 4) ends the text before the first stop string, found across token
boundaries, with finish_reason "stop"; the request is aborted in the engine at once. The token
that ends a request (EOS, a `stop_token_ids` id) adds no text. Streamed text is detokenized
incrementally, so a character split across tokens arrives whole.

The response `id` is the request id ("cmpl-..." / "chatcmpl-..."), minted once here: the
store's key, the gRPC GetRequest argument and the log field.
"""

from .app import create_app
from .generation import DEFAULT_TIMEOUT_S
from .server import HttpLimits, uvicorn_config

__all__ = ["DEFAULT_TIMEOUT_S", "HttpLimits", "create_app", "uvicorn_config"]
