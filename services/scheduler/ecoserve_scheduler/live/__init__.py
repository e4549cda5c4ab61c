"""The live scheduler's shells around the pure core (I/O, clock, sockets live here)."""

from .engine import LiveEngine, RequestHandle

__all__ = ["LiveEngine", "RequestHandle"]
