"""The model's tokenizer without transformers (the scheduler carries no torch): `tokenizers`
for tokenizer.json, jinja2 for the chat template (`chat_template.jinja`, where transformers 5
saves it, else tokenizer_config.json's `chat_template`), config.json for the model's limits.
Behaves as transformers' fast tokenizer does for what the scheduler asks of it: `encode` adds
the post-processor's special tokens (BOS), `decode` keeps special tokens (unless told to skip
them), and `apply_chat_template` renders the template with `messages` and
`add_generation_prompt`.

End of sequence: `eos_token_id` is the tokenizer's EOS token (else generation_config.json's,
else config.json's first id); `eos_token_ids` is every id that ends a turn: that one plus
generation_config.json's and config.json's `eos_token_id` (an id or a list of ids).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer


class ModelTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the scheduler needs a fast tokenizer file")
        self._tok = Tokenizer.from_file(str(path))
        tok_cfg = _read_json(d / "tokenizer_config.json")
        model_cfg = _read_json(d / "config.json")
        gen_cfg = _read_json(d / "generation_config.json")
        self.chat_template: str | None = _chat_template(d, tok_cfg)
        self.bos_token = _token_text(tok_cfg.get("bos_token"))
        self.eos_token = _token_text(tok_cfg.get("eos_token"))
        eos = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        ids = [eos] + _ids(gen_cfg.get("eos_token_id")) + _ids(model_cfg.get("eos_token_id"))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in ids if i is not None))
        self.eos_token_id: int | None = self.eos_token_ids[0] if self.eos_token_ids else None
        self.vocab_size = int(model_cfg.get("vocab_size") or self._tok.get_vocab_size())
        self.max_model_len = int(model_cfg.get("max_position_embeddings") or 4096)
        self._template = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int] | tuple[int, ...], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tokenize: bool = False,
        add_generation_prompt: bool = True,
    ) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(self.chat_template)
        text = self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        if tokenize:
            raise ValueError("apply_chat_template returns text; encode it separately")
        return text


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as text or as {"content": text, ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(d: Path, tok_cfg: dict[str, Any]) -> str | None:
    path = d / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _ids(value: Any) -> list[int]:
    """An `eos_token_id` field: an id, a list of ids, or absent."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _raise(message: str) -> None:
    raise ValueError(message)
