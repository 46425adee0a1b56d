"""Networks: segmentation teachers/students and feature taps for distillation."""

from distill.models.gating import TeacherGate
from distill.models.hooks import FeatureTaps, resolve_module
from distill.models.segmentation import (
    SEGMENTATION_NETWORKS,
    MobileUNet,
    build_segmentation_network,
    count_parameters,
    slim_unet,
    unet,
)

__all__ = [
    "SEGMENTATION_NETWORKS",
    "TeacherGate",
    "FeatureTaps",
    "MobileUNet",
    "build_segmentation_network",
    "count_parameters",
    "resolve_module",
    "slim_unet",
    "unet",
]
