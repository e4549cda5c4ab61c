"""What sampling needs beyond one row's logits: each penalized request's tokens so far
(`TokenHistory`), the penalties themselves (`apply_penalties`, vectorised over rows) and the
min_tokens mask (`mask_tokens`).

Where the tokens come from. A worker sees every token of a request it runs, by position: a
prompt's chunks carry their tokens, a decode row carries the token it feeds (the last output),
and a recompute (after a preemption, a failed step or a dead worker) prefills prompt + outputs
from position 0 on whichever worker takes it. So the history is rebuilt from what plans carry,
never sent whole each step: `record` writes each fed row's tokens at their positions, a row
starting at 0 starts the history afresh. Its invariant: a request's history holds the tokens
at positions [0, len) that this worker was fed; a row that starts past len (a gap: the
history was evicted, least recently used first) drops it, and the row that then samples finds
no history of the right length and fails alone (RowErrors) rather than sampling with wrong
penalties. With `max_requests` far above the sequences a step can hold, a running request is
never evicted: it is touched every step it runs.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from itertools import accumulate

import torch

from ecoserve_common.plan import StepInputs


class TokenHistory:
    """Per penalized request, the token ids fed to this worker at positions 0, 1, ...; at most
    `max_requests` requests, least recently used dropped first."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self._seqs: OrderedDict[str, array] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seqs)

    def record(self, inp: StepInputs) -> None:
        """Write the tokens that `inp.history_rows` feed, each at its positions."""
        rows = inp.history_rows or ()
        lens = inp.query_lens
        offsets = None if lens is None else list(accumulate(lens, initial=0))
        for r in rows:
            start = r if offsets is None else offsets[r]
            end = start + (1 if lens is None else lens[r])
            self.write(inp.request_ids[r], inp.positions[r], inp.token_ids[start:end])

    def write(self, request_id: str, start: int, tokens: Sequence[int]) -> None:
        """Tokens at positions [start, start + len(tokens)); a gap before `start` drops the
        request's history (it cannot be rebuilt here: see the module docstring)."""
        seq = self._seqs.get(request_id)
        if start == 0:
            seq = self._seqs[request_id] = array("q", tokens)
        elif seq is None or len(seq) < start:
            self._seqs.pop(request_id, None)
            return
        else:
            del seq[start:]  # a recompute or a retried step writes these positions again
            seq.extend(tokens)
        self._seqs.move_to_end(request_id)
        while len(self._seqs) > self.max_requests:
            self._seqs.popitem(last=False)

    def tokens(self, request_id: str, end: int) -> torch.Tensor | None:
        """The request's tokens at positions [0, end) as int64, or None if this worker does
        not hold exactly those (never fed, evicted, or a gap)."""
        seq = self._seqs.get(request_id)
        if seq is None or len(seq) != end:
            return None
        if not end:
            return torch.empty(0, dtype=torch.long)
        # A copy: a tensor still viewing the array would keep it from growing.
        return torch.frombuffer(seq, dtype=torch.long).clone()


def _counts(seqs: Sequence[torch.Tensor], vocab: int, device) -> torch.Tensor:
    """[len(seqs), vocab] float counts of each row's token ids (ids outside the vocab are
    ignored): one bincount over the rows' ids shifted by row * vocab."""
    flat = [s[(s >= 0) & (s < vocab)] + j * vocab for j, s in enumerate(seqs)]
    ids = torch.cat(flat).to(device) if flat else torch.empty(0, dtype=torch.long)
    counts = torch.bincount(ids, minlength=len(seqs) * vocab)
    return counts.view(len(seqs), vocab).to(torch.float32)


def apply_penalties(
    logits: torch.Tensor,
    prompts: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    presence: Sequence[float],
    frequency: Sequence[float],
    repetition: Sequence[float],
) -> torch.Tensor:
    """Penalised float32 copy of `logits` [R, vocab]; row j's request has prompt ids
    prompts[j] and generated ids outputs[j] so far.

    Repetition (vLLM / HF, first): a token in the prompt or the outputs has its logit divided
    by repetition[j] when positive, multiplied when negative. Then OpenAI's: minus
    frequency[j] times the token's count in the outputs, minus presence[j] if it is there."""
    x = logits.float().clone()
    rows, vocab = x.shape
    out_counts = _counts(outputs, vocab, x.device)
    seen = out_counts > 0
    if any(r != 1.0 for r in repetition):
        rep = torch.tensor(repetition, dtype=torch.float32, device=x.device)[:, None]
        anywhere = seen | (_counts(prompts, vocab, x.device) > 0)
        scaled = torch.where(x > 0, x / rep, x * rep)
        x = torch.where(anywhere, scaled, x)
    freq = torch.tensor(frequency, dtype=torch.float32, device=x.device)[:, None]
    pres = torch.tensor(presence, dtype=torch.float32, device=x.device)[:, None]
    return x - freq * out_counts - pres * seen.to(torch.float32)


def mask_tokens(logits: torch.Tensor, rows: Sequence[int], ids: Sequence[Sequence[int]]) -> None:
    """In place: logits[rows[j], t] = -inf for each t in ids[j] inside the vocabulary."""
    vocab = logits.shape[-1]
    pairs = [(r, t) for r, ts in zip(rows, ids, strict=True) for t in ts if 0 <= t < vocab]
    if pairs:
        r_idx, t_idx = zip(*pairs, strict=True)
        at = (torch.tensor(r_idx, device=logits.device), torch.tensor(t_idx, device=logits.device))
        logits[at] = float("-inf")
