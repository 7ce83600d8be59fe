"""Inference after training: the Python detector, prompt retrieval, exported graphs and overlays.

The detector is imported on first use, so that `onenip_pl.inference.retrieval` (used by the Lightning
module) can be imported without the detector, which itself imports the Lightning module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Detection", "OneNIPDetector"]

if TYPE_CHECKING:
    from onenip_pl.inference.detector import Detection, OneNIPDetector


def __getattr__(name: str) -> Any:
    if name in __all__:
        from onenip_pl.inference import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'onenip_pl.inference' has no attribute {name!r}")
