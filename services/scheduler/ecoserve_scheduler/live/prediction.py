"""The scheduler's client of the predictor service, with a fallback that never blocks serving.

`predict(prompt, history)` asks the predictor with a deadline. When the predictor is down, slow or
refuses, the request gets the configured default (point and upper) and `failures` counts it;
admission then reserves that default, as vLLM-style schedulers do without any prediction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from ecoserve_common.pb import predictor_pb2 as pb
from ecoserve_common.pb import predictor_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    point: int
    upper: int
    fallback: bool = False


class PredictorClient:
    def __init__(
        self,
        address: str | None,
        timeout_s: float = 0.05,
        default_point: int = 256,
        default_upper: int = 512,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.default = Prediction(default_point, default_upper, fallback=True)
        self._stub = None
        if address:
            self._channel = grpc.insecure_channel(address)
            self._stub = pb_grpc.PredictorStub(self._channel)
        self._lock = threading.Lock()
        self.calls = 0
        self.failures = 0
        self.latency_s_total = 0.0

    def predict(self, prompt: str, history: Sequence[int] = ()) -> Prediction:
        """`history`: the earlier assistant answers' lengths in tokens, oldest first (a chat
        request's conversation; empty for a completion)."""
        if self._stub is None or not prompt.strip():
            return self.default
        t0 = time.perf_counter()
        req = pb.PredictRequest(prompts=[prompt])
        if history:
            req.histories.append(pb.History(answer_tokens=list(history)))
        try:
            r = self._stub.Predict(req, timeout=self.timeout_s)
            (p,) = r.predictions
            out = Prediction(max(1, round(p.point_tokens)), max(1, round(p.upper_tokens)))
        except grpc.RpcError as e:
            with self._lock:
                self.failures += 1
            log.debug("predictor failed (%s): default used", e.code())
            out = self.default
        with self._lock:
            self.calls += 1
            self.latency_s_total += time.perf_counter() - t0
        return out

    def close(self) -> None:
        if self._stub is not None:
            self._channel.close()
