"""Picking tokens from a step's logits: greedy, temperature, top-k, top-p, and per-request seeded
generators that make a request's samples reproducible whatever else shares the batch.

`Sampler.sample` reads the step's sampling columns (`StepInputs.sampling_sets` and
`sampling_index`): when every distinct setting is greedy, the step is one argmax over the batch;
otherwise each sampling row is drawn on its own. A row whose sampling raises, or whose logits or
probabilities are not finite, is reported by request id (`RowErrors`) after every other row has
been drawn: one poisoned row never costs the rest of the batch their tokens.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ecoserve_common.plan import StepInputs


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
    than a softmax of infinities.
    """
    logits = logits.float()
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled).all()) and bool(torch.isfinite(logits).all()):
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


class RowErrors(RuntimeError):
    """Sampling failed for some rows of a step; `errors` maps request id -> message. Every
    other row was drawn: `tokens` holds their tokens (None where a row failed)."""

    def __init__(self, errors: dict[str, str], tokens: list[int | None]) -> None:
        first = next(iter(errors.items()))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"sampling failed for request {first[0]!r}: {first[1]}{more}")
        self.errors = errors
        self.tokens = tokens


class Sampler:
    """Samples a step's tokens; keeps each seeded request's generator across steps, least
    recently used first, at most `max_generators` of them."""

    def __init__(self, device: torch.device | str, max_generators: int) -> None:
        self.device = device
        self.max_generators = max_generators
        self.generators: OrderedDict[str, torch.Generator] = OrderedDict()

    def sample(self, logits: torch.Tensor, inp: StepInputs) -> list[int]:
        """One token per sampling row of `inp`; `logits` has one row per sampling row."""
        sets = inp.sampling_sets
        rids = inp.request_ids
        rows = inp.sample_rows
        if all(sp.temperature <= 0 for sp in sets):
            # All greedy (the common case): one argmax over the batch, not one per row, and
            # one check that no row's logits hold NaN or inf (argmax would pick garbage).
            tokens = greedy(logits)
            if len(tokens) and not bool(torch.isfinite(logits).all()):
                bad = (~torch.isfinite(logits).all(-1)).nonzero().flatten().tolist()
                errors = {
                    rids[i if rows is None else rows[i]]: "logits are not finite" for i in bad
                }
                raise RowErrors(errors, [None if i in bad else t for i, t in enumerate(tokens)])
            return tokens
        tokens: list[int | None] = []
        errors: dict[str, str] = {}
        for i, k in enumerate(inp.sampling_index):
            sp = sets[k]
            rid = rids[i if rows is None else rows[i]]
            try:
                gen = None
                if sp.temperature > 0 and sp.seed is not None:
                    gen = self.generator(rid, sp.seed)
                tokens.append(sample(logits[i], sp.temperature, sp.top_p, sp.top_k, gen))
            except Exception as exc:  # one row's bad settings must not cost the other rows
                errors[rid] = f"{type(exc).__name__}: {exc}"
                tokens.append(None)
        if errors:
            raise RowErrors(errors, tokens)
        return tokens  # type: ignore[return-value]

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
