"""LightningModules: one per method, on :class:`DistillModuleBase`."""

from distill.modules.base import DistillModuleBase
from distill.modules.multi_teacher import MultiTeacherDistillModule
from distill.modules.phase import PhaseClassifierModule, TCNPhaseModule
from distill.modules.seg_distill import SegDistillBase, SegDistillModule
from distill.modules.segmentation import SegmentationModule
from distill.modules.ssl import MoCoEncoder, MoCoModule
from distill.modules.ssl_distill import MoCoDistillModule
from distill.modules.teacher_runtime import FrozenTeachers

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
