"""Chat messages as OpenAI's clients send them, turned into what a chat template takes:
[{"role", "content": str, ("name")}].

- `content` is a string or a list of parts; text parts are joined with "\\n" (as vLLM joins
  them; OpenAI does not say), any other part type (image_url, input_audio, file, refusal) is a
  400 naming the type and `messages.I.content.J.type`.
- `content` null or absent is allowed for assistant messages (OpenAI allows it there: a turn
  that was only tool calls or a refusal) and renders as ""; for any other role it is a 400.
- `developer` (OpenAI's newer name for system instructions) is handed to the template as is when
  the template mentions it, else as `system`, which every template knows.
- Tool calling is not served, so tool / function messages and an assistant turn's `tool_calls`,
  `function_call`, `audio` or `refusal` are a 400 naming them.

Then the model's chat template renders them (in the app's pool: a template can be slow); a model
without one gets a plain "role: content" transcript.
"""

from __future__ import annotations

from .bodies import ChatMessage, ChatRequest
from .edge import BadRequest

TOOLS = "tool calling is not supported"


def template_messages(body: ChatRequest, template: object) -> list[dict[str, str]]:
    """The messages for the template `template` (the tokenizer's chat_template: a string, a
    dict of named templates, or None); raises BadRequest naming the field at fault."""
    if not body.messages:
        raise BadRequest("messages is empty", "messages")
    knows_developer = "developer" in str(template or "")
    out = []
    for i, m in enumerate(body.messages):
        at = f"messages.{i}"
        if m.role in ("tool", "function"):
            raise BadRequest(f"{at}: {m.role} messages are not supported ({TOOLS})", f"{at}.role")
        for field in ("tool_calls", "function_call", "audio", "tool_call_id", "refusal"):
            if getattr(m, field) is not None:
                raise BadRequest(f"{at}.{field} is not supported ({TOOLS})", f"{at}.{field}")
        role = "system" if m.role == "developer" and not knows_developer else m.role
        message = {"role": role, "content": _text(m, at)}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def _text(m: ChatMessage, at: str) -> str:
    content = m.content
    if content is None:
        if m.role == "assistant":
            return ""
        raise BadRequest(f"{at}.content is required for {m.role} messages", f"{at}.content")
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        where = f"{at}.content.{j}"
        if part.type != "text":
            kind = part.type if len(part.type) <= 40 else part.type[:37] + "..."
            raise BadRequest(
                f"{where}: content part type {kind!r} is not supported (only 'text')",
                f"{where}.type",
            )
        if part.text is None:
            raise BadRequest(f"{where}: a text part needs `text`", f"{where}.text")
        texts.append(part.text)
    return "\n".join(texts)


def check_size(messages: list[dict[str, str]], max_chars: int) -> None:
    """Refuse what the prompt limit would refuse anyway, before a template renders it."""
    chars = sum(len(m["content"]) for m in messages)
    if chars > max_chars:
        raise BadRequest(f"messages have {chars} characters; at most {max_chars}", "messages")


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text (runs in the app's pool). A template that refuses the messages (e.g.
    roles that do not alternate) is a 400 naming `messages`."""
    if not getattr(tokenizer, "chat_template", None):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template's own raise_exception, or a template error
        message = (str(e).splitlines() or [""])[0][:300]
        raise BadRequest(f"the chat template refused the messages: {message}", "messages") from e


def answer_lengths(tokenizer, messages: list[dict[str, str]]) -> tuple[int, ...]:
    """The conversation's earlier assistant answers, in the served model's tokens, oldest first
    (what the predictor's history blend reads; runs in the app's pool with `render`)."""
    return tuple(len(tokenizer.encode(m["content"])) for m in messages if m["role"] == "assistant")
