"""Token ids to text as they stream, and OpenAI's `stop` strings cut across token boundaries.

`TextStream.push(ids)` returns the text those ids add, holding back what is not final yet: the
end of a multi-byte character split across tokens (it decodes as U+FFFD until the rest comes)
and, with stop strings, a tail that could be the start of one. When a stop string shows up,
`push` returns the text before it and sets `stopped`; the stop string and what follows are
never returned. `flush()` returns what is held back once the request has ended.

Decoding follows vLLM's offsets: each push decodes a short window (`prefix` ids before the new
ones, for tokenizers whose decode of a token depends on the one before it) and keeps only what
the new ids add, so a long response costs no more per token than a short one.
"""

from __future__ import annotations

from collections.abc import Sequence

from ecoserve_common.sampling import MAX_STOP_STRINGS

MAX_STOP = MAX_STOP_STRINGS  # OpenAI's limit on stop strings per request (checked at the edge)
PREFIX_TOKENS = 6  # ids of context decoded before the new ones


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (returned or held back)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False
        self.tokens_used = 0  # ids up to and including the one that completed a stop string
        self._prefix = 0  # ids[_prefix:_read] decode to text already in `text`
        self._read = 0

    def push(self, ids: Sequence[int]) -> str:
        """The text `ids` add that is final now ("" once stopped)."""
        if self.stopped:
            return ""
        for token in ids:  # one at a time: a stop string ends the stream at its token
            self.ids.append(token)
            self.tokens_used += 1
            if self._decode_new() and self.stop and self._find_stop():
                break
        return self._release()

    def flush(self) -> str:
        """What was held back, once no more ids will come."""
        if self.stopped:
            return ""
        if self._read < len(self.ids):  # a character that never completed: decode as is
            self.text += self._window(self._prefix, len(self.ids))[
                len(self._window(self._prefix, self._read)) :
            ]
            self._read = len(self.ids)
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    # ---- internals ---------------------------------------------------------------------------

    def _window(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end])

    def _decode_new(self) -> bool:
        """Append what the ids past `_read` add to `text`; False while they end mid-character."""
        before = self._window(self._prefix, self._read)
        after = self._window(self._prefix, len(self.ids))
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        self.text += after[len(before) :]
        self._prefix = max(0, len(self.ids) - PREFIX_TOKENS)
        self._read = len(self.ids)
        # the window's start moved: what the new window decodes before `_read` is context only
        return True

    def _find_stop(self) -> bool:
        """Cut `text` at the first stop string (searching from where one could still begin)."""
        longest = max(len(s) for s in self.stop)
        start = max(0, self.sent - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = True
        return True

    def _release(self) -> str:
        end = len(self.text)
        if self.stop and not self.stopped:
            end -= _held_back(self.text, self.stop, self.sent)
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


def _held_back(text: str, stops: tuple[str, ...], sent: int) -> int:
    """Characters at the end of `text` (past `sent`) that could start a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text) - sent), hold, -1):
            if s.startswith(text[len(text) - n :]):
                hold = n
                break
    return hold
