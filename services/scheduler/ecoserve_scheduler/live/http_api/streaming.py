"""A request's text on the event loop: no thread waits for its tokens.

The engine puts a request's events on a `queue.Queue` (its RequestHandle) from its own thread.
A thread per waiting request would let a few dozen slow streams take the whole thread pool, and
/health with it; instead `notify_on_put` has the queue wake an asyncio.Event after each put (one
event for all n choices of a request), and `text_pieces` drains the queues without blocking
whenever it wakes. The per-event work (store transitions, detokenizing, stop strings) is the
Frontend's Follow / TextFollow, the same the blocking gRPC path runs, so both edges record the
same ends. The pieces one drain gives are merged into one (they are final together).

Invariant: no event is lost between a drain and a wait. The event is cleared before each round
of drains; a put after the clear sets it again (from the engine's thread, via
call_soon_threadsafe), so the wait that follows a round of empty drains returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Callable, Sequence

from ecoserve_common.plan import TokenLogprob

from ..follow import Follow, Piece
from ..frontend import Frontend, GenerateParams


def notify_on_put(q: queue.Queue, notify: Callable[[], None]) -> None:
    """Have `q` call `notify()` after each later put, in the putting thread and under the
    queue's lock (so `notify` must be quick and must not touch `q`). `_put` is the hook
    queue.Queue's subclasses override; the engine made this queue, so its instance's is
    wrapped rather than its class replaced."""
    put = q._put  # type: ignore[attr-defined]

    def put_and_notify(item) -> None:
        put(item)
        notify()

    q._put = put_and_notify  # type: ignore[attr-defined]


def _waker(event: asyncio.Event) -> Callable[[], None]:
    loop = asyncio.get_running_loop()

    def wake() -> None:
        # Already set: a wake is pending, or the loop cleared it after this put and drains it
        # next (it clears before it drains), so one wake per wait, not one per token.
        if event.is_set():
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(event.set)

    return wake


def _merged(pieces: list[Piece]) -> Piece | None:
    """The pieces one drain gave, as one: they became final together, so sending them apart
    would only add chunks (only the last can carry the finish). None if there are none."""
    if not pieces:
        return None
    if len(pieces) == 1:
        return pieces[0]
    _, finish, n = pieces[-1]
    return "".join(p[0] for p in pieces), finish, n


async def text_pieces(
    frontend: Frontend,
    follows: Sequence[Follow],
    params: Sequence[GenerateParams],
) -> AsyncIterator[tuple[int, Piece, list[TokenLogprob | None]]]:
    """(choice index, piece, logprobs) for the requests `follows` read (one per choice, with
    the GenerateParams each was started with): (new text, None, tokens so far) as text becomes
    final, then ("", finish, tokens) or the last text with its finish, what
    Frontend.follow_text yields, without a thread. `logprobs` are those of the tokens drained
    since the last piece (empty unless the request asked): text held back (a split character,
    a possible stop string) holds them back too, and after a stop string only the tokens the
    text used count. All choices share one wake-up event, so n choices cost one waiting task.
    TimeoutError once a follow's deadline passes (its request is aborted). However the
    iteration stops (the end, an exception, a cancelled task, `aclose`), every request's end
    is recorded: one still running is aborted."""
    texts = [frontend.text_of(f, p.sampling, p.stop) for f, p in zip(follows, params, strict=True)]
    wants = [p.sampling.logprobs is not None for p in params]
    pending: list[list[TokenLogprob | None]] = [[] for _ in follows]
    sent = [0] * len(follows)
    wake = asyncio.Event()
    waker = _waker(wake)
    for f in follows:
        notify_on_put(f.handle.events, waker)
    try:
        while live := [i for i, f in enumerate(follows) if f.ended is None]:
            wake.clear()
            idle = True
            for i in live:
                if follows[i].ended is not None:  # closed meanwhile (a client that left)
                    continue
                events = follows[i].drain()
                if not events:
                    continue
                idle = False
                if wants[i]:
                    pending[i] += Follow.logprobs_of(events)
                piece = _merged(texts[i].feed(*follows[i].take(events)))
                if piece is not None:
                    if piece[1]:  # the end: no logprob past the tokens the text counts
                        del pending[i][max(0, piece[2] - sent[i]) :]
                    lps, pending[i] = pending[i], []
                    sent[i] += len(lps)
                    yield i, piece, lps
            if idle:
                try:
                    await asyncio.wait_for(wake.wait(), min(follows[i].wait_s() for i in live))
                except asyncio.TimeoutError:
                    for i in live:
                        follows[i].check_deadline()
    finally:
        for f in follows:
            f.close()
