"""The OpenAI API as real clients use it (issue 17), driven by the official `openai` client
in-process (ASGI) over fake engines: chat content parts and roles, fields we do not do refused
by name, and the model routes. Streaming and n choices: tests/test_live_http_choices.py; the
same over a real model and worker: tests/test_live_http.py."""

from __future__ import annotations

import shutil

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from http_fakes import USER, serve_fakes  # noqa: E402

from ecoserve_scheduler.live.http_api.bodies import ChatRequest  # noqa: E402
from ecoserve_scheduler.live.http_api.edge import BadRequest  # noqa: E402
from ecoserve_scheduler.live.http_api.messages import template_messages  # noqa: E402


@pytest.fixture
def api():
    yield from serve_fakes()


# ---- chat messages as clients send them -------------------------------------------------------


def test_content_parts_roles_and_null_assistant_content_reach_the_prompt(api):
    client, _, engine, tok, _ = api()
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Sys"}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "you"}],
        },
        {"role": "assistant", "content": None},
        {"role": "assistant"},
        {"role": "user", "content": "again", "name": "ann"},
    ]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert r.choices[0].message.content == "EE" and r.choices[0].message.role == "assistant"
    # no chat template: the plain transcript, developer as system, text parts joined by "\n"
    assert tok.texts[-1] == (
        "system: Be brief.\nsystem: Sys\nuser: Hello\nyou\nassistant: \nassistant: \n"
        "user: again\nassistant:"
    )
    assert len(engine.submitted) == 1


@pytest.mark.parametrize(
    ("message", "param", "words"),
    [
        (
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                ],
            },
            "messages.0.content.1.type",
            "'image_url'",
        ),
        (
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            "messages.0.content.0.type",
            "'input_audio'",
        ),
        ({"role": "user", "content": [{"type": "text"}]}, "messages.0.content.0.text", "text"),
        ({"role": "user", "content": None}, "messages.0.content", "required"),
        ({"role": "system"}, "messages.0.content", "required"),
        ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "messages.0.role", "tool"),
        (
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]},
            "messages.0.tool_calls",
            "tool",
        ),
        ({"role": "wizard", "content": "x"}, "messages.0.role", "role"),
        (
            {"role": "user", "content": "x", "cache_control": {}},
            "messages.0.cache_control",
            "unrecognized",
        ),
    ],
)
def test_a_message_we_cannot_serve_is_a_400_naming_the_field(api, message, param, words):
    client, raw, engine, *_ = api()
    r = raw.post("/v1/chat/completions", json={"messages": [message], "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["type"]) == (param, "invalid_request_error")
    assert words in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[message], max_tokens=2)
    assert engine.submitted == []


@pytest.mark.parametrize("knows_developer", [False, True])
def test_developer_is_system_for_a_template_that_lacks_it(knows_developer):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    if knows_developer:
        template += "{# developer #}"
    body = ChatRequest(messages=[{"role": "developer", "content": "x"}, *USER])
    got = template_messages(body, template)
    assert got[0] == {"role": "developer" if knows_developer else "system", "content": "x"}
    with pytest.raises(BadRequest, match="empty"):
        template_messages(ChatRequest(messages=[]), template)


def test_the_models_chat_template_renders_content_parts(api, model_dir, tmp_path):
    from ecoserve_scheduler.live.tokenizer import ModelTokenizer

    d = shutil.copytree(model_dir, tmp_path / "m")
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    tok = ModelTokenizer(d)
    client, _, engine, *_ = api(tokenizer=tok)
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    msgs = [{"role": "developer", "content": "d"}, {"role": "user", "content": parts}]
    client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1)
    prompt = tok.decode(list(engine.submitted[-1].prompt_token_ids))
    assert prompt.endswith("[system]d[user]one\ntwo[assistant]")


# ---- fields we do not do: a 400 naming them; harmless ones accepted --------------------------

CHAT_REFUSED = [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
    ("parallel_tool_calls", True),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "high"),
    ("verbosity", "low"),
    ("web_search_options", {}),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}}),
    ("logit_bias", {"50": 10}),
    ("store", True),
    ("service_tier", "flex"),
    ("n", 17),
    ("n", 0),
    ("priority", 5),
    ("priority", 2**40),
    ("priority", "high"),  # typed: an integer
    ("min_tokens", "many"),
    ("min_p", 0.1),  # not OpenAI's, not one of vLLM's we take: unrecognized
    ("stream_options", {"include_sentiment": True}),
]
COMPLETION_REFUSED = [
    ("best_of", 3),
    ("echo", True),
    ("suffix", "end"),
    ("logit_bias", {"50": -100}),
    ("response_format", {"type": "text"}),  # not a completions field
]
CHAT_ACCEPTED = {
    "tools": [],
    "tool_choice": "none",
    "modalities": ["text"],
    "response_format": {"type": "text"},
    "logit_bias": {},
    "store": False,
    "service_tier": "auto",
    "user": "u-1",
    "metadata": {"k": "v"},
    "stream_options": {"include_usage": True},  # without stream: nothing to change
    "prompt_cache_key": "k",
    "safety_identifier": "s",
    "priority": 0,
    "min_tokens": 0,
    "top_k": -1,  # vLLM's "off"
    "temperature": None,
    "top_p": None,
    "n": None,
    "seed": None,
    "stop": None,
}


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [("/v1/chat/completions", f, v) for f, v in CHAT_REFUSED]
    + [("/v1/completions", f, v) for f, v in COMPLETION_REFUSED],
)
def test_a_field_we_do_not_do_is_a_400_naming_it(api, path, field, value):
    client, raw, engine, *_ = api()
    body = {field: value, "max_tokens": 2}
    body |= {"messages": USER} if "chat" in path else {"prompt": "hi"}
    r = raw.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].split(".")[0] == field and field in err["message"]
    assert err["type"] == "invalid_request_error"
    assert engine.submitted == []
    create = client.chat.completions.create if "chat" in path else client.completions.create
    kw = {"messages": USER} if "chat" in path else {"prompt": "hi"}
    with pytest.raises(openai.BadRequestError, match=field):
        create(model="tiny", max_tokens=2, extra_body={field: value}, **kw)


def test_harmless_fields_and_neutral_values_are_accepted(api):
    client, raw, engine, *_ = api()
    r = raw.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **CHAT_ACCEPTED})
    assert r.status_code == 200, r.text
    done = client.completions.create(
        model="tiny", prompt="hi", max_tokens=2, best_of=1, echo=False, user="u", logit_bias={}
    )
    assert done.choices[0].text == "EE" and len(engine.submitted) == 2


# ---- models ------------------------------------------------------------------------------------


def test_models_list_retrieve_and_404_for_another(api):
    client, raw, *_ = api()
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    for name in ("gpt-4o", "org/other"):
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve(name)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert raw.get("/v1/models/").status_code == 404


def test_chat_without_a_cap_may_fill_the_context_and_completions_keep_16(api):
    """OpenAI's chat has no default max_tokens: vLLM's choice, the room the prompt leaves in
    the context; completions keep OpenAI's 16; a cap given either way is kept."""
    client, _, engine, _, frontend = api(max_model_len=64)
    client.chat.completions.create(model="tiny", messages=USER)
    request = engine.submitted[-1]
    assert request.sampling.max_tokens == 64 - request.prompt_len > 0
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=5)
    assert engine.submitted[-1].sampling.max_tokens == 5
    client.chat.completions.create(model="tiny", messages=USER, max_completion_tokens=7)
    assert engine.submitted[-1].sampling.max_tokens == 7
    client.completions.create(model="tiny", prompt="hi")
    assert engine.submitted[-1].sampling.max_tokens == 16
