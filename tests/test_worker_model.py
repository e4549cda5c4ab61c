"""ModelRunner on a paged KV cache must match Hugging Face generate() token for token (fp32).

The worker reuses the HF weights but does its own attention over scheduler-assigned blocks, so
these tests pin the cases the scheduler relies on: mixed prefill/decode batches, chunked prefill,
arbitrary block tables, block reuse, recompute after preemption, and moving blocks.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config  # noqa: E402

from ecoserve_worker.model_runner import ModelRunner, greedy, make_generator, sample  # noqa: E402

BLOCK = 4  # small blocks so short prompts span many of them
NBLK = 16  # blocks per sequence: enough for the longest prompt (35 tokens) + N_NEW
N_NEW = 20
TEXTS = [
    "The scheduler sends the worker a plan every iteration.",
    "Children played on the bank while their parents talked about the harvest and the road.",
    "Short requests may borrow the empty tail of a long request.",
    "Numbers matter too: 1, 2, 3, 42.",
]


@pytest.fixture(scope="module")
def runner(model_dir):
    return ModelRunner(model_dir, num_blocks=128, block_size=BLOCK)


@pytest.fixture(scope="module")
def prompts(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(t).input_ids for t in TEXTS]


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    """HF greedy continuations (N_NEW tokens, EOS suppressed) for every prompt."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    refs = []
    for p in prompts:
        out = model.generate(
            torch.tensor([p]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False
        )
        refs.append(out[0, len(p) :].tolist())
    return refs


def decode_greedy(runner, prompt, table, n, first=None):
    """Prefill ``prompt`` (unless ``first`` is given as its already-sampled token), decode ``n``."""
    out = [first] if first is not None else greedy(runner.step([("r", prompt, 0, table)]))
    while len(out) < n:
        pos = len(prompt) + len(out) - 1
        out += greedy(runner.step([("r", [out[-1]], pos, table)]))
    return out


def test_single_request_matches_hf(runner, prompts, reference):
    assert decode_greedy(runner, prompts[0], list(range(16)), N_NEW) == reference[0]


def test_mixed_batch_prefill_and_decodes(runner, prompts, reference):
    """Seqs join at different steps; each step mixes one prefill with the others' decodes."""
    tables = [list(range(i * NBLK, (i + 1) * NBLK)) for i in range(4)]
    outs: list[list[int]] = [[] for _ in prompts]
    for step in range(N_NEW + len(prompts)):
        batch, who = [], []
        for i, p in enumerate(prompts):
            if step == i:  # seq i prefills at step i, while earlier seqs decode
                batch.append((f"r{i}", p, 0, tables[i]))
            elif step > i and len(outs[i]) < N_NEW:
                batch.append((f"r{i}", [outs[i][-1]], len(p) + len(outs[i]) - 1, tables[i]))
            else:
                continue
            who.append(i)
        for i, tok in zip(who, greedy(runner.step(batch)), strict=True):
            outs[i].append(tok)
    assert outs == reference


def test_equal_length_prompts_prefill_together(runner, prompts, reference):
    """Fresh prompts of one length share one attention call; rows must not see each other."""
    p = prompts[0]
    tables = [list(range(0, NBLK)), list(range(NBLK, 2 * NBLK))[::-1]]
    outs = [[t] for t in greedy(runner.step([("a", p, 0, tables[0]), ("b", p, 0, tables[1])]))]
    while len(outs[0]) < N_NEW:
        pos = len(p) + len(outs[0]) - 1
        seqs = [(rid, [o[-1]], pos, t) for rid, o, t in zip("ab", outs, tables, strict=True)]
        for o, tok in zip(outs, greedy(runner.step(seqs)), strict=True):
            o.append(tok)
    assert outs == [reference[0], reference[0]]


def test_chunked_prefill(runner, prompts, reference):
    """Prompt split into 3 chunks over 3 steps, alongside another sequence's decodes."""
    p, q = prompts[1], prompts[2]
    tp, tq = list(range(64, 80)), list(range(80, 96))
    q_out = greedy(runner.step([("q", q, 0, tq)]))
    cuts = [0, len(p) // 3, 2 * len(p) // 3, len(p)]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        res = greedy(
            runner.step([("p", p[a:b], a, tp), ("q", [q_out[-1]], len(q) + len(q_out) - 1, tq)])
        )
        q_out.append(res[1])
    p_first = res[0]
    assert decode_greedy(runner, p, tp, N_NEW, first=p_first) == reference[1]
    assert q_out == reference[2][: len(q_out)]


@pytest.mark.parametrize(
    "table",
    [[50, 3, 27, 8, 61, 12, 40, 1, 99, 77, 5, 120, 33, 64, 18, 90], list(range(127, 111, -1))],
)
def test_non_contiguous_and_reversed_tables(runner, prompts, reference, table):
    assert decode_greedy(runner, prompts[3], table, N_NEW) == reference[3]


@pytest.mark.parametrize("overhead", [0, 10**6])
def test_decodes_of_different_lengths_grouped_or_padded(
    runner, model_dir, prompts, reference, monkeypatch, overhead
):
    """Decode rows are attended in groups of similar context length (overhead 0: one group
    per power-of-two class) or padded together (huge overhead): the tokens are the same."""
    import ecoserve_worker.attention as attn

    monkeypatch.setattr(attn, "GROUP_OVERHEAD_BLOCKS", overhead)
    short = prompts[0][:3]  # 2 blocks against the others' 4-14
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([short]), max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    cases = [*prompts, short]
    expected = [*reference, out[0, len(short) :].tolist()]
    order = [2, 4, 0, 3, 1]  # not sorted by length: groups scatter back to the right rows
    tables = {i: list(range(i * NBLK, (i + 1) * NBLK)) for i in order}
    seqs = [(f"r{i}", cases[i], 0, tables[i]) for i in order]
    outs = {i: [t] for i, t in zip(order, greedy(runner.step(seqs)), strict=True)}
    widths = [len(cases[i]) // BLOCK + 1 for i in order]
    assert (len(attn.group_by_width(widths, overhead)) > 1) == (overhead == 0)
    while len(outs[order[0]]) < N_NEW:
        seqs = [
            (f"r{i}", [outs[i][-1]], len(cases[i]) + len(outs[i]) - 1, tables[i]) for i in order
        ]
        for i, tok in zip(order, greedy(runner.step(seqs)), strict=True):
            outs[i].append(tok)
    assert [outs[i] for i in range(5)] == expected


def test_prepacked_projections_match_plain_linear(model_dir, prompts):
    """On CPU fp32 the projections run through oneDNN-prepacked weights by default; the
    logits stay within float rounding of F.linear's and greedy tokens are the same."""
    from ecoserve_worker.model_runner import can_prepack

    if not can_prepack(torch.device("cpu"), torch.float32):
        pytest.skip("this torch build has no oneDNN prepacked linear")
    packed = ModelRunner(model_dir, num_blocks=64, block_size=BLOCK)
    plain = ModelRunner(model_dir, num_blocks=64, block_size=BLOCK, prepack=False)
    assert packed.prepack and not plain.prepack
    seqs = [(f"r{i}", p, 0, list(range(i * NBLK, (i + 1) * NBLK))) for i, p in enumerate(prompts)]
    a, b = packed.step(seqs), plain.step(seqs)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert greedy(a) == greedy(b)


def test_group_by_width_partitions_rows():
    from ecoserve_worker.attention import group_by_width

    widths = [1, 9, 2, 3, 40, 8, 1, 33]
    groups = group_by_width(widths, 0)
    assert sorted(i for g in groups for i in g) == list(range(len(widths)))
    for g in groups:  # overhead 0: nothing merged, padding at most doubles a row
        assert max(widths[i] for i in g) < 2 * min(widths[i] for i in g)
    assert group_by_width(widths, 10**6) == [list(range(len(widths)))]  # one group, in order
    assert group_by_width([5, 5, 5], 0) == [[0, 1, 2]]
    merged = group_by_width([1, 1, 2, 64], 4)  # padding 1,1 to 2 costs 2 blocks: merged
    assert merged == [[0, 1, 2], [3]]


def test_reused_blocks_after_garbage(runner, prompts, reference):
    """Blocks freed by another sequence (and random garbage) must not leak into attention."""
    table = list(range(96, 96 + NBLK))
    decode_greedy(runner, prompts[1], table, 10)  # a previous owner of these blocks
    for cache in runner.kv_cache:  # beyond the new prompt: garbage
        cache[:, :, table[4:]] = torch.randn_like(cache[:, :, table[4:]]) * 100
    assert decode_greedy(runner, prompts[0], table, N_NEW) == reference[0]


def test_recompute_after_preemption(runner, prompts, reference):
    """Re-prefill prompt + outputs into different blocks; decoding continues identically."""
    p = prompts[2]
    first = decode_greedy(runner, p, list(range(NBLK)), 8)
    new_table = [20, 25, 21, 26, 22, 27, 23, 28, 120, 121, 122, 123, 30, 31, 32, 33]
    seq = p + first  # recompute everything generated so far, then sample the next token
    nxt = greedy(runner.step([("r", seq, 0, new_table)]))
    rest = decode_greedy(runner, seq, new_table, N_NEW - 8, first=nxt[0])
    assert first + rest == reference[2]


def test_copy_blocks_moves_sequence(runner, prompts, reference):
    p = prompts[0]
    old, new = list(range(NBLK)), list(range(112, 112 + NBLK))
    first = decode_greedy(runner, p, old, 10)
    runner.copy_blocks(list(zip(old, new, strict=True)))
    for cache in runner.kv_cache:
        cache[:, :, old] = torch.randn_like(cache[:, :, old])
    pos = len(p) + len(first) - 1
    out = list(first)
    while len(out) < N_NEW:
        out += greedy(runner.step([("r", [out[-1]], pos, new)]))
        pos += 1
    assert out == reference[0]


def test_seeded_sampling(runner, prompts):
    logits = runner.step([("r", prompts[0], 0, list(range(8)))])[0]

    def draw(seed, **kw):
        gen = make_generator(seed)
        return [sample(logits, temperature=5.0, generator=gen, **kw) for _ in range(30)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert sample(logits, temperature=0.0) == int(torch.argmax(logits))
    assert set(draw(3, top_k=1)) == {int(torch.argmax(logits))}
    assert set(draw(3, top_p=1e-6)) == {int(torch.argmax(logits))}
    assert len(set(draw(4, top_k=3))) <= 3


def test_missing_dir_raises(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ModelRunner(tmp_path / "nope")


def test_unsupported_architecture_raises(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        ModelRunner(tmp_path)


def test_missing_weights_raise(tmp_path, model_dir):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="cannot load weights"):
        ModelRunner(tmp_path)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_llama_family_models(tmp_path, prompts, arch):
    """Qwen2 (q/k/v bias) and Mistral (sliding window, here shorter than the sequence)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[arch]
    extra = {"sliding_window": 8} if arch == "mistral" else {}
    config = cfg_cls(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **extra,
    )
    torch.manual_seed(1)
    model = model_cls(config).eval()
    model.save_pretrained(tmp_path)
    p = prompts[1]
    ref = model.generate(
        torch.tensor([p]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False
    )[0, len(p) :].tolist()
    runner = ModelRunner(tmp_path, num_blocks=NBLK, block_size=BLOCK)
    assert decode_greedy(runner, p, list(range(NBLK - 1, -1, -1)), N_NEW) == ref


def test_tokenizer_round_trips_with_bos_eos(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("The river ran slowly, 42 times?").input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id is not None
    assert tok.decode(ids, skip_special_tokens=True) == "The river ran slowly, 42 times?"
    assert len(tok) <= 512


def test_bad_plans_raise(runner, prompts):
    p = prompts[0]
    with pytest.raises(ValueError, match="block table has 1 blocks"):
        runner.step([("r", p, 0, [0])])
    with pytest.raises(ValueError, match="outside pool"):
        runner.step([("r", p, 0, [0, 1, 2, 500])])
    with pytest.raises(ValueError, match="same KV slot"):
        runner.step([("a", p, 0, list(range(NBLK))), ("b", p, 0, list(range(NBLK)))])
    with pytest.raises(ValueError, match="no tokens"):
        runner.step([("r", [], 0, [0])])


def test_a_tiny_temperature_samples_its_greedy_limit():
    """logits / 1e-45 overflows float32: the draw is the argmax, not a softmax of infinities."""
    logits = torch.randn(40, generator=torch.Generator().manual_seed(0))
    for t in (1e-45, 1e-300):
        assert sample(logits, temperature=t, generator=make_generator(1)) == int(logits.argmax())


def test_one_rows_sampling_failure_spares_the_other_rows():
    """A row whose sampling raises (here NaN logits) is reported by request id; every other
    row is still drawn."""
    from dataclasses import replace

    from ecoserve_common.sampling import SamplingParams
    from ecoserve_worker.model_runner import inputs_from_rows
    from ecoserve_worker.sampling import RowErrors, Sampler

    inp = inputs_from_rows([(rid, [1], 0, [i]) for i, rid in enumerate("abc")])
    inp = replace(inp, sampling_sets=[SamplingParams(temperature=1.0, seed=5)])
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    logits[1] = float("nan")
    with pytest.raises(RowErrors, match="request 'b'") as e:
        Sampler("cpu", 8).sample(logits, inp)
    assert list(e.value.errors) == ["b"]
    assert e.value.tokens[1] is None and all(isinstance(e.value.tokens[i], int) for i in (0, 2))
