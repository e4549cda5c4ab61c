"""Picking tokens from a step's logits: greedy, temperature, top-k, top-p, per-request seeded
generators that make a request's samples reproducible whatever else shares the batch, and what
OpenAI's and vLLM's APIs add: presence / frequency / repetition penalties, min_tokens, logprobs.

`Sampler.sample_step` reads the step's sampling columns (`StepInputs.sampling_sets` and
`sampling_index`): when every distinct setting is plain greedy, the step is one argmax over the
batch; otherwise each sampling row is drawn on its own, and only the rows that ask for more get
more work, vectorised over those rows:

1. logprobs: log_softmax of the row's raw logits, before anything below (vLLM v1's default,
   "raw logprobs"): the sampled token's logprob and the top N, most likely first;
2. penalties (`penalties.apply_penalties`): repetition over prompt + outputs, then frequency and
   presence over the outputs, before temperature, top-k and top-p;
3. min_tokens: EOS (the model's, unless ignore_eos) and the request's stop_token_ids are masked
   (-inf) while fewer than min_tokens tokens were generated.

Penalties need the request's tokens, min_tokens how many it generated. Plans carry neither in
full: each plan carries the tokens its rows feed, and (only when some row needs it) each row's
prompt length, so generated = position after the row - prompt length. The tokens themselves are
rebuilt here from what the plans fed this worker (`penalties.TokenHistory`, like the seeded
generators an LRU keyed by request id): a request recomputed elsewhere after a preemption
re-feeds every token from position 0, so its new worker rebuilds the same history; one whose
history is lost fails alone rather than sampling with wrong penalties. See penalties.py.

A row whose sampling raises, or whose logits or probabilities are not finite, is reported by
request id (`RowErrors`) after every other row has been drawn: one poisoned row never costs the
rest of the batch their tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ecoserve_common.plan import StepInputs, TokenLogprob
from ecoserve_common.sampling import SamplingParams

from .penalties import TokenHistory, apply_penalties, mask_tokens


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> int:
    """Pick one token id from 1-D logits; temperature 0 is greedy (argmax).

    A per-request seeded ``generator`` makes a request's samples reproducible regardless of what
    else shares the batch. ``top_k <= 0`` and ``top_p >= 1`` disable those filters. A
    temperature so small that logits / temperature overflows is greedy too (its limit), rather
    than a softmax of infinities. Logits already -inf (masked tokens) stay out of the draw.
    """
    logits = logits.float()
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    scaled = logits / temperature
    if bool((torch.isinf(scaled) & torch.isfinite(logits)).any()):  # overflowed
        return int(torch.argmax(logits))
    logits = scaled
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token crossing top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # NaN logits, or every token filtered out
        raise ValueError("sampling probabilities are not finite")
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded for one request, so its sampling is reproducible."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def greedy(logits: torch.Tensor) -> list[int]:
    """Argmax token for each row of ``step``'s logits [S, vocab]."""
    if not len(logits):
        return []
    return logits.argmax(-1).tolist()


class Sampled(NamedTuple):
    """A step's draw: one token per sampling row; `logprobs` is empty when no row asked for
    them, else one entry per row (None for a row that did not ask)."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None] | tuple = ()


class RowErrors(RuntimeError):
    """Sampling failed for some rows of a step; `errors` maps request id -> message. Every
    other row was drawn: `tokens` holds their tokens (None where a row failed), `logprobs`
    their logprobs as in `Sampled`."""

    def __init__(
        self,
        errors: dict[str, str],
        tokens: list[int | None],
        logprobs: list[TokenLogprob | None] | tuple = (),
    ) -> None:
        first = next(iter(errors.items()))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"sampling failed for request {first[0]!r}: {first[1]}{more}")
        self.errors = errors
        self.tokens = tokens
        self.logprobs = logprobs


class Sampler:
    """Samples a step's tokens. Keeps, least recently used dropped first, at most
    `max_generators` seeded requests' generators and as many penalized requests' token
    histories (see the module docstring). `eos_ids`: the model's EOS ids, which min_tokens
    masks."""

    def __init__(
        self, device: torch.device | str, max_generators: int, eos_ids: Sequence[int] = ()
    ) -> None:
        self.device = device
        self.max_generators = max_generators
        self.eos_ids = tuple(eos_ids)
        self.generators: OrderedDict[str, torch.Generator] = OrderedDict()
        self.history = TokenHistory(max_generators)

    def sample(self, logits: torch.Tensor, inp: StepInputs) -> list[int]:
        """One token per sampling row of `inp` (`sample_step` without the logprobs)."""
        return self.sample_step(logits, inp).tokens

    def sample_step(self, logits: torch.Tensor, inp: StepInputs) -> Sampled:
        """One token per sampling row of `inp`, and the logprobs rows asked for; `logits` has
        one row per sampling row. The penalized rows' logits are changed in place (this
        step's, read by nothing after). Raises RowErrors when some rows failed."""
        if inp.history_rows:  # every fed row of a penalized request, sampling or not
            self.history.record(inp)
        if all(sp.temperature <= 0 and not sp.processed for sp in inp.sampling_sets):
            return Sampled(self._all_greedy(logits, inp))  # the common case
        return self._draw(logits, inp)

    def _all_greedy(self, logits: torch.Tensor, inp: StepInputs) -> list[int]:
        """One argmax over the batch, not one per row. A row fails when the logit its argmax
        picked is not finite: argmax propagates NaN and +inf, and a row of only -inf picks
        -inf, so that one gather finds every row whose greedy token would be garbage, without
        a pass over the whole [rows, vocab] tensor (a full isfinite check cost ~3 ms of a
        46 ms 16-row SmolLM2 step). A -inf among finite logits is a masked token, not an
        error."""
        if not len(logits):
            return []
        picked = logits.argmax(-1)
        tokens = picked.tolist()
        best = logits.gather(-1, picked[:, None])[:, 0]
        bad = [] if bool(torch.isfinite(best).all()) else (~torch.isfinite(best)).nonzero()
        bad = [int(i) for i in bad]
        if bad:
            rid = _request_of(inp)
            errors = {rid(i): "logits are not finite" for i in bad}
            raise RowErrors(errors, [None if i in bad else t for i, t in enumerate(tokens)])
        return tokens

    @torch.inference_mode()  # the runner's logits are inference tensors: changed in place here
    def _draw(self, logits: torch.Tensor, inp: StepInputs) -> Sampled:
        sets, index, rid = inp.sampling_sets, inp.sampling_index, _request_of(inp)
        errors = {rid(i): "logits are not finite" for i in self._nonfinite_rows(logits)}
        asked = [i for i, k in enumerate(index) if sets[k].logprobs is not None]
        raw = torch.log_softmax(logits[asked].float(), -1) if asked else None  # before changes
        self._process(logits, inp, errors)
        drawn: list[int | None]
        if all(sp.temperature <= 0 for sp in sets):
            drawn = list(greedy(logits))
        else:
            drawn = [
                self._sample_row(logits[i], sets[k], rid(i), errors) for i, k in enumerate(index)
            ]
        tokens = [None if rid(i) in errors else t for i, t in enumerate(drawn)] if errors else drawn
        logprobs: list[TokenLogprob | None] | tuple = ()
        if raw is not None:
            counts = [sets[index[i]].logprobs or 0 for i in asked]
            logprobs = gather_logprobs(raw, asked, counts, tokens)
        if errors:
            raise RowErrors(errors, tokens, logprobs)
        return Sampled(tokens, logprobs)  # type: ignore[arg-type]

    def _process(self, logits: torch.Tensor, inp: StepInputs, errors: dict[str, str]) -> None:
        """Penalties and min_tokens masks, in place, on the sampling rows that ask for them;
        a row whose plan or history cannot support them gets its error instead."""
        sets, index, rid = inp.sampling_sets, inp.sampling_index, _request_of(inp)
        if not any(sp.needs_prompt_len for sp in sets):
            return  # logprobs or temperature only: nothing to change
        rows, lens = inp.sample_rows, inp.prompt_lens
        penalized: list[tuple[int, int, torch.Tensor]] = []  # (row, prompt_len, tokens)
        masked: list[int] = []
        for i, k in enumerate(index):
            sp = sets[k]
            if not sp.needs_prompt_len or rid(i) in errors:
                continue
            r = i if rows is None else rows[i]
            prompt_len, end = (lens[r] if lens else 0), inp.row_end(r)
            if not 0 < prompt_len <= end:
                errors[rid(i)] = "the plan carries no prompt length for this row"
                continue
            if end - prompt_len < sp.min_tokens:  # end - prompt_len: tokens generated so far
                masked.append(i)
            if sp.penalized:
                seq = self.history.tokens(rid(i), end)
                if seq is None:
                    errors[rid(i)] = "this worker lost the request's tokens (needed by penalties)"
                    continue
                penalized.append((i, prompt_len, seq))
        if penalized:
            picked = [sets[index[i]] for i, _, _ in penalized]
            at = [i for i, _, _ in penalized]
            logits[at] = apply_penalties(
                logits[at],
                [seq[:n] for _, n, seq in penalized],
                [seq[n:] for _, n, seq in penalized],
                [sp.presence_penalty for sp in picked],
                [sp.frequency_penalty for sp in picked],
                [sp.repetition_penalty for sp in picked],
            ).to(logits.dtype)
        mask_tokens(logits, masked, [self._stop_ids(sets[index[i]]) for i in masked])

    def _stop_ids(self, sp: SamplingParams) -> tuple[int, ...]:
        return tuple(sp.stop_token_ids) + (() if sp.ignore_eos else self.eos_ids)

    def _sample_row(
        self, row: torch.Tensor, sp: SamplingParams, request_id: str, errors: dict[str, str]
    ) -> int | None:
        if request_id in errors:
            return None
        try:
            gen = None
            if sp.temperature > 0 and sp.seed is not None:
                gen = self.generator(request_id, sp.seed)
            return sample(row, sp.temperature, sp.top_p, sp.top_k, gen)
        except Exception as exc:  # one row's bad settings must not cost the other rows
            errors[request_id] = f"{type(exc).__name__}: {exc}"
            return None

    @staticmethod
    def _nonfinite_rows(logits: torch.Tensor) -> list[int]:
        if not len(logits) or bool(torch.isfinite(logits).all()):
            return []
        return (~torch.isfinite(logits).all(-1)).nonzero().flatten().tolist()

    def generator(self, request_id: str, seed: int) -> torch.Generator:
        gen = self.generators.get(request_id)
        if gen is None:
            gen = make_generator(seed, self.device)
            self.generators[request_id] = gen
            while len(self.generators) > self.max_generators:
                self.generators.popitem(last=False)
        else:
            self.generators.move_to_end(request_id)
        return gen


def _request_of(inp: StepInputs):
    """Sampling row i -> its request id."""
    rows, rids = inp.sample_rows, inp.request_ids
    if rows is None:
        return rids.__getitem__
    return lambda i: rids[rows[i]]


def gather_logprobs(
    raw: torch.Tensor, asked: list[int], counts: list[int], tokens: Sequence[int | None]
) -> list[TokenLogprob | None]:
    """One entry per token: for sampling row asked[j], whose log_softmax is raw[j], the sampled
    token's logprob and the counts[j] most likely tokens, most likely first; None elsewhere
    (rows that did not ask, and rows that failed)."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    k = min(max(counts), raw.shape[-1])
    top_v, top_i = torch.topk(raw, k, dim=-1) if k else (raw[:, :0], raw[:, :0].long())
    picked = torch.tensor([[tokens[i] or 0] for i in asked], device=raw.device)
    chosen = raw.gather(1, picked)[:, 0].tolist()
    values, ids = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(asked):
        token = tokens[i]
        if token is not None:
            n = counts[j]
            out[i] = TokenLogprob(
                token, chosen[j], tuple(zip(ids[j][:n], values[j][:n], strict=True))
            )
    return out
