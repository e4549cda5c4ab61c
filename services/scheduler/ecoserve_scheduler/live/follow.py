"""One request's events as its caller reads them: what the Frontend's blocking `follow` /
`follow_text` (gRPC threads) and the HTTP API's async streams (http_api/streaming.py) share.

A `Follow` turns the events a caller drained from the request's handle into (new tokens, finish
reason), and their logprobs when the request asked for them (`logprobs_of`), and records the
request's store transitions exactly once: running at its first token, then one terminal state
(finished / failed / aborted). `close()` is the caller's last word, whatever stopped it (the
end, a deadline, a client that hung up, an exception): a request that has not ended is looked
for a finish among the events already queued, else cancelled in the engine and recorded
aborted. So no row stays queued or running once its caller is gone. The same end is counted
against the request's SLO (Frontend.record_slo): TTFT from when the edge received it to when
its first token is taken here, TPOT over the tokens after that, as the server sees them.

`TextFollow` is the text path over a Follow: incremental detokenization (detokenize.TextStream),
the token that ends a request left out of the text, and stop strings that end the request with
"stop" (cancelled in the engine, recorded finished with the tokens up to the stop string).
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ecoserve_common.plan import TokenLogprob

from ..core.events import FinishEvent, TokenEvent
from .detokenize import TextStream

if TYPE_CHECKING:
    from .engine import RequestHandle
    from .frontend import Frontend

MAX_WAIT_S = 3600.0  # one blocking wait at most: far below what threading and the OS accept

Piece = tuple[str, str | None, int]  # (new text, finish reason, tokens so far)


class Follow:
    def __init__(self, frontend: Frontend, handle: RequestHandle, timeout_s: float | None) -> None:
        """`timeout_s`: None (or one too large to mean anything) waits as long as it takes."""
        self.frontend = frontend
        self.handle = handle
        too_long = timeout_s is None or not timeout_s < 10 * 365 * 86400  # NaN, inf, grpc's max
        self.deadline = None if too_long else time.monotonic() + max(0.0, timeout_s or 0.0)
        self.started = False
        self.first_s: float | None = None  # when the first token was taken (Frontend.clock)
        self.ended: str | None = None

    @property
    def request_id(self) -> str:
        return self.handle.request_id

    def wait_s(self) -> float:
        """How long the next wait may block: the time left before the deadline, capped."""
        if self.deadline is None:
            return MAX_WAIT_S
        return min(MAX_WAIT_S, max(0.0, self.deadline - time.monotonic()))

    def check_deadline(self) -> None:
        """Past the deadline: abort the request and raise TimeoutError."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.frontend.cancel(self.request_id)
            self.finish("aborted")
            raise TimeoutError("deadline passed; request aborted")

    def next_events(self) -> list:
        """Block for the next events: every one already queued, up to a finish (a reader that
        fell behind catches up in one hop); TimeoutError once the deadline passes."""
        while True:
            try:
                first = self.handle.events.get(timeout=self.wait_s())
            except queue.Empty:
                self.check_deadline()
                continue
            return self._with_queued([first])

    def drain(self) -> list:
        """The events queued now, up to a finish; empty if none (never blocks)."""
        return self._with_queued([])

    def _with_queued(self, events: list) -> list:
        with contextlib.suppress(queue.Empty):
            while not events or not isinstance(events[-1], FinishEvent):
                events.append(self.handle.events.get_nowait())
        return events

    def take(self, events: Sequence) -> tuple[list[int], str | None]:
        """(new tokens, finish reason or None) of `events`; marks the row running at the first
        token. The caller records the finish (`finish`) before handing anything on."""
        tokens = [ev.token_id for ev in events if isinstance(ev, TokenEvent)]
        if tokens and not self.started:
            self.started = True
            self.first_s = self.frontend.clock()
            self.frontend.store_call("mark_running", self.request_id)
        last = events[-1] if events else None
        return tokens, last.reason if isinstance(last, FinishEvent) else None

    @staticmethod
    def logprobs_of(events: Sequence) -> list[TokenLogprob | None]:
        """The logprobs of the tokens `take(events)` returns, aligned with them: each one's
        TokenLogprob, or None where there is none (the request did not ask for logprobs, or
        a simulated worker drew it). The whole request's so far: `handle.logprobs`."""
        return [ev.logprob for ev in events if isinstance(ev, TokenEvent)]

    def finish(self, reason: str, tokens: int | None = None) -> None:
        """Record how the request ended (once: later calls do nothing), in the store and in
        its SLO class's counts."""
        if self.ended is None:
            self.ended = reason
            n = len(self.handle.tokens) if tokens is None else tokens
            self.frontend.record_end(self.request_id, reason, n)
            self.frontend.record_slo(self.handle, reason, n, self.first_s)

    def close(self, reason: str = "aborted") -> None:
        """The caller is done reading. A request that has not ended ends now: with the finish
        already queued if there is one, else cancelled in the engine and recorded `reason`."""
        if self.ended is not None:
            return
        events = self.drain()
        if events and isinstance(events[-1], FinishEvent):
            self.finish(events[-1].reason)
            return
        self.frontend.cancel(self.request_id)
        self.finish(reason)


class TextFollow:
    def __init__(self, follow: Follow, tokenizer, ending: Iterable[int], stop: Sequence[str]):
        """`ending`: token ids that end the request and add no text (EOS, stop_token_ids)."""
        self.follow = follow
        self.ending = set(ending)
        self.text = TextStream(tokenizer, stop)

    def feed(self, tokens: list[int], finish: str | None) -> list[Piece]:
        """The pieces `tokens` (and the finish, if any) add; records the end before returning
        it, so a caller that stops after the last piece leaves nothing unrecorded."""
        f, text, out = self.follow, self.text, []
        n = len(f.handle.tokens)
        if tokens:
            piece = text.push([t for t in tokens if t not in self.ending])
            if text.stopped:
                f.frontend.cancel(f.request_id)
                f.finish("stop", text.tokens_used)
                used = text.tokens_used
                return [*([(piece, None, used)] if piece else []), ("", "stop", used)]
            if piece:
                out.append((piece, None, n))
        if finish:
            f.finish(finish)
            rest = text.flush()
            if rest:
                out.append((rest, None, n))
            out.append(("", finish, n))
        return out
