"""OpenAI's `logprobs` objects from the engine's per-token TokenLogprob (ecoserve_common.plan).

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
"bytes"}]}], "refusal": null}`. Completions (the legacy shape): `{"tokens", "token_logprobs",
"top_logprobs": [{token: logprob}], "text_offset"}`, where each top dict also holds the sampled
token, as vLLM's does. Values are the model's raw log-probabilities (see TokenLogprob); a
token's text is its own decode (so a token holding part of a UTF-8 character shows U+FFFD;
`bytes` are of that text; the response's joined text is always whole). -inf, which JSON cannot
carry, is sent as -9999.0, as vLLM does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ecoserve_common.plan import TokenLogprob

FLOOR = -9999.0  # what -inf (a token the logits ruled out) is sent as


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


class LogprobText:
    """Renders one request's logprobs; keeps each token id's text (decoded once) and, for
    completions, each choice's text offset so far."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        self._offsets: dict[int, int] = {}

    def token(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token(token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode())}

    def chat(self, logprobs: Sequence[TokenLogprob | None]) -> dict[str, Any]:
        content = []
        for lp in logprobs:
            if lp is None:  # a worker that drew no logprobs (a simulated one)
                continue
            entry = self._entry(lp.token_id, lp.logprob)
            entry["top_logprobs"] = [self._entry(t, v) for t, v in lp.top]
            content.append(entry)
        return {"content": content, "refusal": None}

    def completion(self, choice: int, logprobs: Sequence[TokenLogprob | None]) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        out["text_offset"] = []
        offset = self._offsets.get(choice, 0)
        for lp in logprobs:
            if lp is None:
                continue
            text = self.token(lp.token_id)
            top = {self.token(t): _value(v) for t, v in lp.top}
            top.setdefault(text, _value(lp.logprob))
            out["tokens"].append(text)
            out["token_logprobs"].append(_value(lp.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(text)
        self._offsets[choice] = offset
        return out
