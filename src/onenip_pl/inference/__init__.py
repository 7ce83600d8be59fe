"""Inference after training: the Python detector, exported graphs and overlays.

The detector is imported on first use, so that importing a submodule (the overlay painter, say) does not
build the detector's imports.
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
