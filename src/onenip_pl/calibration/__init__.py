"""Fixing the fusion scale and the decision thresholds on normal images, before any test."""

from onenip_pl.calibration.post_processor import (
    FUSION_MODES,
    MapBatches,
    PostProcessor,
    TestSetFusion,
    collect_maps,
)
from onenip_pl.calibration.rules import THRESHOLD_RULES

__all__ = ["FUSION_MODES", "THRESHOLD_RULES", "MapBatches", "PostProcessor", "TestSetFusion", "collect_maps"]
