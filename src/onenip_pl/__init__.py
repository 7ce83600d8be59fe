"""OneNIP multi-class anomaly detection with one normal image prompt, on Lightning and Hydra."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["OneNIPDetector", "__version__"]

if TYPE_CHECKING:
    from onenip_pl.inference.detector import OneNIPDetector


def __getattr__(name: str) -> Any:
    """Import the detector (and with it torch) only when asked for: `import onenip_pl` stays light."""
    if name == "OneNIPDetector":
        from onenip_pl.inference.detector import OneNIPDetector

        return OneNIPDetector
    raise AttributeError(f"module 'onenip_pl' has no attribute {name!r}")
