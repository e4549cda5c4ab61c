"""Build a tiny random-weight Llama checkpoint plus a real BPE tokenizer, fully offline.

Tests and demos need a model directory that looks exactly like a real Hugging Face checkpoint
(config.json, safetensors weights, tokenizer files) but machines are offline and CI has no GPU.
This writes one in a few seconds: random weights, and a byte-level BPE trained on a few built-in
English paragraphs so that text round-trips through a genuine tokenizer.

Usage: ``python -m ecoserve_worker.tiny_model OUT_DIR``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 (trainer adds specials first)

CORPUS = """\
The serving system keeps two scarce resources busy in every iteration: the compute of the
accelerator and the memory that holds the key and value cache. A request arrives with a prompt,
waits in a queue, and is admitted when the scheduler can reserve enough cache for its prompt and
for the response it is predicted to produce.

Each iteration the scheduler sends the worker a plan. The plan names the sequences to run, the
token ids to feed, the position where each chunk starts, and the table of blocks where the cache
of each sequence lives. The worker writes the new keys and values into those blocks, attends over
everything the sequence has written so far, and returns one sampled token for every sequence.

Short requests may borrow the empty tail of a long request. The long request writes one token per
iteration, so its tail stays empty for a long time. When the borrower is predicted to finish late,
the scheduler moves it to fresh blocks before the owner reaches that space.

The weather was mild and the river ran slowly past the old mill. Children played on the bank while
their parents talked about the harvest, the price of bread, and the new road to the city. In the
evening the lamps were lit one by one, and the town grew quiet under a sky full of stars.

Numbers matter too: 1, 2, 3, 10, 42, 100, 2024. Questions end with a mark? Lists use commas, and
sentences end with a period. Quotes look like "this", and code looks like f(x) = x * 2 + 1.
"""


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on CORPUS; byte-level means any text encodes, with no unknowns."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )


def build_tiny_model(
    out_dir: str | Path,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random LlamaForCausalLM (safetensors) and its tokenizer into ``out_dir``.

    ``kv_heads < heads`` by default so grouped-query attention is exercised, as in real models.
    Returns the directory path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Llama + BPE tokenizer.")
    parser.add_argument("out_dir")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    out = build_tiny_model(a.out_dir, a.vocab_size, a.hidden, a.layers, a.heads, a.kv_heads, a.seed)
    print(out)


if __name__ == "__main__":
    main()
