"""Networks: segmentation teachers/students, feature taps for distillation, pretrained image
backbones, self-supervision pieces (MoCo) and temporal phase models (TCN)."""

from distill.models.backbones import (
    PUBLIC_DEFAULT,
    build_backbone,
    load_pretrained_weights,
    public_model_weights_path,
)
from distill.models.fusion import fold_batch_norms
from distill.models.gating import TeacherGate
from distill.models.hooks import FeatureTaps, resolve_module
from distill.models.segmentation import (
    SEGMENTATION_NETWORKS,
    MobileUNet,
    build_segmentation_network,
    count_parameters,
    init_output_prior,
    slim_unet,
    unet,
)
from distill.models.ssl import (
    MemoryQueue,
    MoCoEncoder,
    ProjectionHead,
    batch_shuffle_ddp,
    batch_unshuffle_ddp,
    build_moco_encoder,
    concat_all_gather,
    cosine_momentum,
    update_momentum,
)
from distill.models.temporal import MultiStageTCN, SingleStageTCN, TCNShape

__all__ = [
    "PUBLIC_DEFAULT",
    "SEGMENTATION_NETWORKS",
    "TeacherGate",
    "FeatureTaps",
    "MemoryQueue",
    "MobileUNet",
    "MoCoEncoder",
    "MultiStageTCN",
    "ProjectionHead",
    "SingleStageTCN",
    "TCNShape",
    "batch_shuffle_ddp",
    "batch_unshuffle_ddp",
    "build_backbone",
    "build_moco_encoder",
    "build_segmentation_network",
    "concat_all_gather",
    "cosine_momentum",
    "fold_batch_norms",
    "count_parameters",
    "init_output_prior",
    "load_pretrained_weights",
    "public_model_weights_path",
    "resolve_module",
    "slim_unet",
    "unet",
    "update_momentum",
]
