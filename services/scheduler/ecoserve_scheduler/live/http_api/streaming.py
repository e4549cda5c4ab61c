"""A request's text on the event loop: no thread waits for its tokens.

The engine puts a request's events on a `queue.Queue` (its RequestHandle) from its own thread.
A thread per waiting request would let a few dozen slow streams take the whole thread pool, and
/health with it; instead `notify_on_put` has the queue wake this request's asyncio.Event after
each put, and `text_pieces` drains the queue without blocking whenever it wakes. The per-event
work (store transitions, detokenizing, stop strings) is the Frontend's Follow / TextFollow, the
same the blocking gRPC path runs, so both edges record the same ends.

Invariant: no event is lost between a drain and a wait. The event is cleared before each drain;
a put after the clear sets it again (from the engine's thread, via call_soon_threadsafe), so the
wait that follows an empty drain returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Callable

from ecoserve_common.sampling import SamplingParams

from ..engine import RequestHandle
from ..follow import Follow, Piece
from ..frontend import Frontend


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


async def text_pieces(
    frontend: Frontend,
    handle: RequestHandle,
    sampling: SamplingParams,
    stop: tuple[str, ...],
    timeout_s: float | None,
    on_follow: Callable[[Follow], None] = lambda f: None,
) -> AsyncIterator[Piece]:
    """(new text, None, tokens so far) as it becomes final, then ("", finish, tokens): what
    Frontend.follow_text yields, without a thread. TimeoutError once `timeout_s` passes (the
    request is aborted). However the iteration stops (the end, an exception, a cancelled task,
    `aclose`), the request's end is recorded: a request still running is aborted.
    `on_follow` gets the Follow first (to close it from elsewhere, say on a disconnect)."""
    follow = frontend.following(handle, timeout_s)
    text = frontend.text_of(follow, sampling, stop)
    on_follow(follow)
    wake = asyncio.Event()
    notify_on_put(handle.events, _waker(wake))
    try:
        while follow.ended is None:
            wake.clear()
            events = follow.drain()
            if not events:
                try:
                    await asyncio.wait_for(wake.wait(), follow.wait_s())
                except asyncio.TimeoutError:
                    follow.check_deadline()
                continue
            for piece in text.feed(*follow.take(events)):
                yield piece
    finally:
        follow.close()
