"""ModelTokenizer (tokenizers + jinja2, no transformers) against transformers' AutoTokenizer on
the tiny model: the same ids, text, EOS id and rendered chat template."""

from __future__ import annotations

import json
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from ecoserve_scheduler.live.tokenizer import ModelTokenizer  # noqa: E402

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A Llama-2-style template: bos_token, raise_exception and whitespace control.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}\n"
    "  {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}\n"
    "  {% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (('<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n') if loop.first and sys"
    " else '') + message['content'] + ' [/INST]' }}\n"
    "  {% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}\n"
    "{% endfor %}"
)
TEXTS = [
    "hello",
    "The scheduler sends the worker a plan.",
    "  leading spaces, punctuation!? and numbers 12345",
    "",
    "ünïcödé and emoji 🙂",
]
MESSAGES = [
    [{"role": "user", "content": "Tell me about rivers."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"},
    ],
]


def test_encode_decode_eos_equal_transformers(model_dir):
    ours = ModelTokenizer(model_dir)
    ref = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert ours.eos_token_id == ref.eos_token_id is not None
    assert ours.chat_template is None and not getattr(ref, "chat_template", None)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids), text
    some = list(range(0, 200, 7)) + [ref.eos_token_id]
    assert ours.decode(some) == ref.decode(some)  # special tokens kept, as transformers does


@pytest.mark.parametrize("template", [CHATML, LLAMA2], ids=["chatml", "llama2"])
def test_chat_template_equals_transformers(model_dir, tmp_path, template):
    d = tmp_path / "chat-model"
    shutil.copytree(model_dir, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg))
    ours = ModelTokenizer(d)
    ref = transformers.AutoTokenizer.from_pretrained(d)
    for messages in MESSAGES:
        for gen in (True, False):
            want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want
    if template is LLAMA2:
        bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        with pytest.raises(ValueError, match="alternate"):
            ours.apply_chat_template(bad)


def test_chat_template_jinja_file_and_generation_config_eos_list(model_dir, tmp_path):
    """transformers 5 saves the template as chat_template.jinja; generation_config.json may
    list several EOS ids: the first is eos_token_id, all are eos_token_ids."""
    d = tmp_path / "smol-like"
    shutil.copytree(model_dir, d)
    (d / "chat_template.jinja").write_text(CHATML)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5, 7]}))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = ModelTokenizer(d)
    assert ours.chat_template == CHATML
    assert ours.eos_token_id == 2 and ours.eos_token_ids == (2, 5, 7)
    ref = transformers.AutoTokenizer.from_pretrained(d)
    want = ref.apply_chat_template(MESSAGES[0], tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES[0]) == want


def test_eos_ids_from_the_tokenizer_first_then_the_configs(model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 2]}))
    ours = ModelTokenizer(d)
    assert ours.eos_token_id == 2 and ours.eos_token_ids == (2, 9)  # "</s>" is id 2
