"""The LitServe API of the inspection server: requests queued by LitServe are scored in dynamic batches.

LitServe runs ``setup`` and ``predict`` in an inference worker process; ``decode_request``'s annotation
tells it to parse each HTTP request with ``read_predict_request`` in the HTTP process, so a batch only ever
holds checked, decoded images. (No ``from __future__ import annotations`` here: LitServe and FastAPI read
that annotation as an object.)
"""

from dataclasses import dataclass
from typing import Annotated, Any

import litserve as ls
from fastapi import Depends

from onenip_pl.inference import Detection, OneNIPDetector
from onenip_pl.serving.inputs import PredictRequest, read_predict_request
from onenip_pl.serving.outputs import ModelIdentity, detection_json


@dataclass(frozen=True)
class ServeSettings:
    """What the inference worker needs to load and answer (it is pickled into that process)."""

    ckpt_path: str
    runtime: str
    identity: ModelIdentity
    map_full_scale: float | None


class InspectionAPI(ls.LitAPI):
    """`POST /predict`: one image in, its category, score, decision and thresholds out."""

    def __init__(self, settings: ServeSettings, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.settings = settings
        self.detector: OneNIPDetector | None = None

    def setup(self, device: str) -> None:
        self.detector = OneNIPDetector.from_checkpoint(
            self.settings.ckpt_path, device=device, runtime=self.settings.runtime
        )

    def decode_request(
        self, request: Annotated[PredictRequest, Depends(read_predict_request)]
    ) -> PredictRequest:
        return request

    def predict(
        self, requests: PredictRequest | list[PredictRequest]
    ) -> tuple[PredictRequest, Detection] | list[tuple[PredictRequest, Detection]]:
        """Score a batch (LitServe hands a single request when max_batch_size=1). Requests naming the same
        category share one detector call; those without a category are retrieved together."""
        if isinstance(requests, PredictRequest):
            return self._score([requests])[0]
        return self._score(list(requests))

    def _score(self, requests: list[PredictRequest]) -> list[tuple[PredictRequest, Detection]]:
        groups: dict[str | None, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.category, []).append(index)
        detections: list[Detection | None] = [None] * len(requests)
        for category, indices in groups.items():
            found = self.detector.predict(
                [requests[index].rgb for index in indices], category=category, batch_size=len(indices)
            )
            for index, detection in zip(indices, found, strict=True):
                detections[index] = detection
        return list(zip(requests, detections, strict=True))

    def encode_response(self, output: tuple[PredictRequest, Detection]) -> dict[str, Any]:
        request, detection = output
        return detection_json(
            detection,
            request.rgb,
            self.detector.thresholds(detection.category),
            self.settings.identity,
            self.settings.map_full_scale if request.want_map else None,
            request.want_overlay,
        )
