"""The model's tokenizer without transformers (the scheduler carries no torch): `tokenizers`
for tokenizer.json, jinja2 for the chat template in tokenizer_config.json, config.json for the
model's limits. Behaves as transformers' fast tokenizer does for what the scheduler asks of it:
`encode` adds the post-processor's special tokens (BOS), `decode` keeps special tokens, and
`apply_chat_template` renders the template with `messages` and `add_generation_prompt`.
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
        self.chat_template: str | None = tok_cfg.get("chat_template")
        self.bos_token = _token_text(tok_cfg.get("bos_token"))
        self.eos_token = _token_text(tok_cfg.get("eos_token"))
        eos = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        cfg_eos = model_cfg.get("eos_token_id")
        self.eos_token_id: int | None = eos if eos is not None else _first(cfg_eos)
        self.vocab_size = int(model_cfg.get("vocab_size") or self._tok.get_vocab_size())
        self.max_model_len = int(model_cfg.get("max_position_embeddings") or 4096)
        self._template = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

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


def _first(value: Any) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _raise(message: str) -> None:
    raise ValueError(message)
