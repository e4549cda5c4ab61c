"""Serving-side predictor: an artifact directory run by ONNX Runtime (no torch).

The CUDA execution provider is used when ONNX Runtime has it (onnxruntime-gpu on a GPU host)
and the caller did not ask for CPU; otherwise the CPU provider.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .features import Encoder, bucket_of
from .history import META_KEY, HistoryBlend

PACKAGED_ARTIFACT = Path(__file__).resolve().parent / "artifact"


@dataclass(frozen=True)
class Predictions:
    point: np.ndarray  # float32 [N], median response tokens
    upper: np.ndarray  # float32 [N], upper-quantile response tokens
    bucket: np.ndarray  # int64 [N]


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        raise ValueError(f"device {device!r} asked for, but ONNX Runtime has only {available}")
    return ["CPUExecutionProvider"]


class OnnxPredictor:
    def __init__(
        self, artifact: str | Path = PACKAGED_ARTIFACT, device: str = "auto", threads: int = 0
    ) -> None:
        path = Path(artifact)
        missing = [
            f for f in ("model.onnx", "tokenizer.json", "meta.json") if not (path / f).is_file()
        ]
        if missing:
            raise FileNotFoundError(f"predictor artifact {path} lacks {', '.join(missing)}")
        self.meta = json.loads((path / "meta.json").read_text())
        self.encoder = Encoder.load(path / "tokenizer.json", self.meta["head"], self.meta["tail"])
        self.edges = tuple(self.meta["bucket_edges"])
        self.upper_shift = float(self.meta.get("upper_log_shift", 0.0))  # calibrated at training
        self.model_id = f"{self.meta['kind']}-{self.meta.get('source', '')}".rstrip("-")
        # Issue 20 item 1: fit by `ecoserve-predictor fit-history`; absent in older artifacts.
        blend = self.meta.get(META_KEY)
        self.history_blend = HistoryBlend.from_meta(blend) if blend else None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # ORT's pool busy-waits between runs by default: measured 25 ms of CPU per one-prompt
        # call against 3 ms without, CPU the model workers on the same host then lack.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(path / "model.onnx"), opts, providers=providers_for(device)
        )
        self.providers = self.session.get_providers()

    def model_predict(self, prompts: list[str]) -> Predictions:
        """The prompt model alone: what `predict` gives a row without history."""
        ids, mask, feats = self.encoder.encode(prompts)
        (logs,) = self.session.run(None, {"ids": ids, "mask": mask, "feats": feats})
        point = np.expm1(logs[:, 0]).clip(min=1.0)
        upper = np.maximum(np.expm1(logs[:, 1] + self.upper_shift), point)
        return Predictions(point, upper, bucket_of(point, self.edges))

    def predict(
        self, prompts: list[str], histories: Sequence[Sequence[object] | None] | None = None
    ) -> Predictions:
        """`histories`, one per prompt when given: the conversation's earlier turns, oldest
        first (`history.Turn`, or anything with `response_tokens`; see history.py). With the
        artifact's `history_blend`, a row with a known earlier answer gets the blend of the
        model and that history; the others, and every row without the blend, the model's."""
        if histories is not None and len(histories) != len(prompts):
            raise ValueError(f"{len(histories)} histories for {len(prompts)} prompts")
        out = self.model_predict(prompts)
        if histories is None or self.history_blend is None:
            return out
        point, upper = self.history_blend.apply(out.point, out.upper, histories)
        return Predictions(point, upper, bucket_of(point, self.edges))
