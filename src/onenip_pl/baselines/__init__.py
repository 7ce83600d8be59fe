"""Baselines that OneNIP is measured against on the same images and backbone."""

from onenip_pl.baselines.knn import PatchKNN

__all__ = ["PatchKNN"]
