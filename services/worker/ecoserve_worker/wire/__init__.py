"""Scheduler <-> worker wire format: protobuf messages (proto/worker.proto), one per frame."""

from .codec import (
    PROTOCOL_VERSION,
    WireError,
    decode,
    encode,
    plan_from_proto,
    plan_to_proto,
    result_from_proto,
    result_to_proto,
)

__all__ = [
    "PROTOCOL_VERSION",
    "WireError",
    "decode",
    "encode",
    "plan_from_proto",
    "plan_to_proto",
    "result_from_proto",
    "result_to_proto",
]
