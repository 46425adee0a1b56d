"""LightningModules: one per method, on :class:`DistillModuleBase`."""

from distill.modules.base import DistillModuleBase
from distill.modules.segmentation import SegDistillModule, SegmentationModule

__all__ = ["DistillModuleBase", "SegDistillModule", "SegmentationModule"]
