"""LightningModules: one per method, on :class:`DistillModuleBase`."""

from distill.modules.base import DistillModuleBase
from distill.modules.multi_teacher import MultiTeacherDistillModule
from distill.modules.phase import PhaseClassifierModule, TCNPhaseModule
from distill.modules.segmentation import SegDistillBase, SegDistillModule, SegmentationModule
from distill.modules.ssl import MoCoDistillModule, MoCoEncoder, MoCoModule
from distill.modules.teachers import FrozenTeachers

__all__ = [
    "DistillModuleBase",
    "FrozenTeachers",
    "MoCoDistillModule",
    "MoCoEncoder",
    "MoCoModule",
    "MultiTeacherDistillModule",
    "PhaseClassifierModule",
    "SegDistillBase",
    "SegDistillModule",
    "SegmentationModule",
    "TCNPhaseModule",
]
