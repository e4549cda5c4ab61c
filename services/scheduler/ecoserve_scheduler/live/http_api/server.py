"""How the HTTP API is served: its limits (`HttpLimits`) and the uvicorn Config that applies them
(`uvicorn_config`).

uvicorn bounds a request's header size (h11's max incomplete event size) and times out an idle
keep-alive connection after a response, but a connection that sends a partial header, or a new
one that sends nothing, is never timed out: a few hundred such sockets hold file descriptors and
buffers for good (slowloris). `HeaderTimeoutH11Protocol` closes a connection whose request head
(request line and headers) is not complete `header_timeout_s` after the connection opened or the
previous response ended, however slowly its bytes trickle in. A body is then bounded in size and
time by the app's EdgeGuard (edge.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on what one client can make the HTTP API hold; the defaults fit a chat prompt of
    the longest context with room to spare."""

    max_body_bytes: int = 4 << 20  # a larger body is a 413, unread
    body_timeout_s: float = 30.0  # a body not complete by then is a 408
    header_timeout_s: float = 10.0  # a request head not complete by then closes the connection
    max_header_bytes: int = 16 << 10  # h11's bound on a request head (a larger one is a 400)
    keep_alive_s: int = 5  # an idle keep-alive connection closes after this (uvicorn's own)
    start_threads: int = 4  # threads that tokenize, predict and submit new requests


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection whose request head is not complete
    `header_timeout_s` after it became idle (opened, or its previous response ended) is
    closed. Invariant: the timer runs exactly while h11 waits for a request head."""

    header_timeout_s = HttpLimits.header_timeout_s

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()  # waits for the next request's head (if one is not in already)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_with(limits: HttpLimits) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class with `limits.header_timeout_s` (uvicorn builds one per connection)."""
    return type(
        "HeaderTimeoutH11Protocol",
        (HeaderTimeoutH11Protocol,),
        {"header_timeout_s": limits.header_timeout_s},
    )


def uvicorn_config(
    app: Any, host: str, port: int, limits: HttpLimits | None = None, **kw: Any
) -> uvicorn.Config:
    """The uvicorn Config serving `app` under `limits` (the same ones create_app was given)."""
    limits = limits or HttpLimits()
    kw.setdefault("log_level", "warning")
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_with(limits),
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        **kw,
    )
