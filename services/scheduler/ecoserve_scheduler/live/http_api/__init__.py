"""OpenAI-compatible HTTP API over the Frontend: /v1/completions, /v1/chat/completions
(streaming as server-sent events, or not), /v1/models and /v1/models/{model}, /health
(readiness), /livez (liveness), Prometheus /metrics, /stats.

Layout: `bodies` (every request body: OpenAI's fields and vLLM's extensions), `fields` (the
declared fields we do not do, refused by name; `n`, `priority`), `messages` (chat content parts
and roles to the chat template), `schemas` (every response body and the Reply shapes that build
them), `completions` and `chat` (their routers), `admin` (health, models, metrics, stats),
`generation` (what the two generating routes share), `choices` (n engine requests for one
prompt), `output` (a started request to one JSON body or an SSE stream), `streaming` (its text
on the event loop, no thread per stream), `edge` (API key, body size and time, error handlers),
`server` (HttpLimits and the uvicorn Config: header timeouts), `metrics` (Prometheus series),
`logprobs` (OpenAI's logprobs objects), `app` (the factory that wires them).

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for bad
input (`param` names the field where one is at fault, e.g. "seed"), including a field that is
not OpenAI's or a vLLM extension we take ("unrecognized request argument supplied") and one we
declare but do not do, set to anything but its neutral value (tools, response_format
json_object / json_schema, best_of > 1, audio, ...: fields.py), 401 without the API key,
404 `model_not_found` for a `model` other than the served one (an empty or omitted `model`
means the served one), 408 for a body too slow, 413 for a body too large, 429 with Retry-After
when over capacity, 500 `server_error` for a request that failed in the engine (with its
reason) or anything unexpected ("internal error"), 504 when the request's timeout passes.

Chat messages take `content` as a string or a list of text parts (other part types are a 400
naming the type), null for assistant turns, and the developer role (as system for a template
that lacks it); see messages.py. `n` (at most 16) runs n engine requests for the prompt,
tokenized once (the prefill is not shared: no prefix cache yet), choice i seeded with seed + i;
admission counts all n and a client that leaves aborts all n (choices.py).

Streams are OpenAI's: the chat role only in each choice's first delta, the finish_reason on the
chunk that ends a choice, `usage` only with `stream_options.include_usage` (then null on every
chunk and a last chunk with `choices: []` and the usage), then `data: [DONE]`. A whole response
always carries usage; usage counts the prompt once and every choice's completion tokens.

`logprobs` (chat: `logprobs: true` and `top_logprobs` 0..20; completions: `logprobs` 0..20)
returns each token's log-probability of the model's raw distribution (vLLM v1's default) and
its top alternatives, in OpenAI's chat or legacy completions shape (logprobs.py), streamed with
the chunk that carries the token's text. Penalties (`presence_penalty`, `frequency_penalty`,
vLLM's `repetition_penalty`) and vLLM's `min_tokens` are applied by the worker's sampler.

`stop` (a string or up to 4) ends the text before the first stop string, found across token
boundaries, with finish_reason "stop"; the request is aborted in the engine at once. The token
that ends a request (EOS, a `stop_token_ids` id) adds no text. Streamed text is detokenized
incrementally, so a character split across tokens arrives whole.

The `ecoserve` body object is the request's latency SLO (live/slo.py): `slo_class` and/or
`ttft_ms`, `tpot_ms`, `deadline_ms` (the `openai` client: `extra_body={"ecoserve": {...}}`),
checked before admission (a 400 naming `ecoserve.<field>`); /metrics exports attainment per
class (metrics.py).

The response `id` is the request id ("cmpl-..." / "chatcmpl-..."), minted once here: the
store's key, the gRPC GetRequest argument and the log field (choice i > 0 of an n-choice request
is `<id>-<i>`).
"""

from .app import create_app
from .generation import DEFAULT_TIMEOUT_S
from .server import HttpLimits, uvicorn_config

__all__ = ["DEFAULT_TIMEOUT_S", "HttpLimits", "create_app", "uvicorn_config"]
