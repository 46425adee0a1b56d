"""LightningModules: one per method, on :class:`DistillModuleBase`."""

from distill.modules.base import DistillModuleBase
from distill.modules.multi_teacher import MultiTeacherDistillModule
from distill.modules.segmentation import SegDistillBase, SegDistillModule, SegmentationModule
from distill.modules.teachers import FrozenTeachers

__all__ = [
    "DistillModuleBase",
    "FrozenTeachers",
    "MultiTeacherDistillModule",
    "SegDistillBase",
    "SegDistillModule",
    "SegmentationModule",
]
