"""Surgical phase recognition downstream of pre-training: a frame classifier, then a temporal model.

- :class:`PhaseClassifierModule` on :class:`data_modules.surgical.SurgicalPhaseDataModule`
  batches ``{"image": (B, 3, S, S) ImageNet-normalised, "label": (B,), "video", "frame"}``: a
  backbone (from a MoCo pre-training checkpoint, or the public ImageNet model) and a linear head,
  linear probe or full fine-tuning. ``distill predict`` with
  :class:`distill.callbacks.PhaseFeatureWriter` writes per-video feature arrays for the TCN.
- :class:`TCNPhaseModule` on :class:`data_modules.surgical.PhaseFeatureDataModule` batches
  ``{"features": (1, D, T), "label": (1, T), "video": [name], "frame": (1, T) 25 fps index}``:
  a causal single-stage TCN (the reference: 12 layers, 64 maps) or a multi-stage MS-TCN, scored
  with the relaxed phase metrics (corrected and published evaluation of the MATLAB protocol).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from distill.errors import DataError
from distill.formats.phases import VIDEO_FPS, write_phase_file
from distill.losses.temporal import phase_segmentation_loss
from distill.metrics.calibration import N_BINS
from distill.metrics.phase import PhaseReport, evaluate_phases
from distill.models.backbones import FrameClassifier, build_frame_classifier
from distill.models.temporal import TCNShape
from distill.modules.base import DistillModuleBase
from distill.modules.checkpoints import load_network
from distill.types import NonNegativeFloat, PositiveFloat, PositiveInt
from distill.utils import atomic_write, child_path, unique_path, write_text_atomic

#: Written beside a TCN's test predictions: its evaluation protocol and results.
PROTOCOL_FILE = "protocol.json"


def protocol_lines(protocol: dict) -> dict[str, str]:
    """A phase run's :meth:`TCNPhaseModule.protocol` as readable ``{what: value}`` lines."""
    split = protocol.get("split") or {}
    return {
        "temporal model": protocol["temporal_model"],
        "predictions": f"{', '.join(f'{f:g}' for f in protocol['prediction_fps'])} fps",
        "relaxed boundary": f"{protocol['tolerance_s']:g} s = {', '.join(map(str, protocol['tolerance_frames']))} frames",
        "split": "; ".join(f"{part}: {', '.join(videos) or '-'}" for part, videos in split.items()) or "not recorded",
        "tested on": ", ".join(protocol["test_videos"]),
    }


class PhaseClassifierModule(DistillModuleBase):
    """Per-frame phase classifier: backbone + linear head, linear probe or full fine-tuning.

    Args:
        backbone, backbone_source: timm (or torchvision) network name; must be the pre-trained one.
        backbone_weights: None, ``"public"`` (packaged ImageNet EfficientNet-Lite0: the
            ImageNet-supervised baseline) or a weights file; ignored with ``pretrained_checkpoint``.
        pretrained_checkpoint: a MoCo pre-training checkpoint or run directory; its query
            encoder's backbone initialises this one when fitting starts.
        mode: ``"linear_probe"`` (frozen backbone, batch-norm statistics too; head only) or
            ``"finetune"`` (everything trains).
        class_weights: weight the cross-entropy by the training labels' median frequency
            (the DataModule's ``class_weights()``).
        head_lr: learning rate of the head (its own parameter group); None: the optimiser's.
        optimizer: default Adam; it and the other shared options: see :class:`DistillModuleBase`.

    Frame accuracy is logged as ``val/acc`` and ``test/acc``, the multi-class expected calibration
    error (top-1 confidence, 15 bins) as ``val/ece`` and ``test/ece``.
    """

    loss_term_names = ("ce",)
    default_loss_weights = {"ce": 1.0}
    network_family = "phase_classifier"
    progress_bar_metrics = ("acc",)
    compiled_modules = ("backbone",)

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_source: Literal["timm", "torchvision"] = "timm",
        backbone_weights: str | None = None,
        pretrained_checkpoint: str | None = None,
        mode: Literal["linear_probe", "finetune"] = "finetune",
        num_classes: PositiveInt = 7,
        class_weights: bool = False,
        head_lr: PositiveFloat | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        **kwargs,
    ) -> None:
        super().__init__(optimizer=optimizer, **kwargs)
        weights = None if pretrained_checkpoint else backbone_weights
        classifier = build_frame_classifier(backbone, num_classes, weights=weights, source=backbone_source)
        self.backbone, self.head = classifier.backbone, classifier.head
        if mode == "linear_probe":
            self.backbone.requires_grad_(False)
        self.register_buffer("ce_weights", torch.ones(num_classes), persistent=False)
        self.init_evaluation_metrics(
            lambda: MetricCollection(
                {
                    "acc": MulticlassAccuracy(num_classes, average="micro"),
                    "ece": MulticlassCalibrationError(num_classes, n_bins=N_BINS, norm="l1"),
                }
            )
        )
        self.train()  # Lightning keeps the modes set here: a probed backbone starts in eval mode

    def train(self, mode: bool = True) -> PhaseClassifierModule:
        """A linear probe keeps the backbone's batch-norm statistics."""
        super().train(mode)
        if self.hparams.mode == "linear_probe":
            self.backbone.eval()
        return self

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self.hparams.pretrained_checkpoint:
            self.load_pretrained_backbone(self.hparams.pretrained_checkpoint)
        if self.hparams.class_weights:
            self.ce_weights.copy_(self.trainer.datamodule.class_weights().to(self.ce_weights))

    def load_pretrained_backbone(self, checkpoint: str) -> None:
        """Copy the query backbone of a MoCo checkpoint (file or run directory) into :attr:`backbone`."""
        encoder = load_network(checkpoint, family="moco")
        try:
            self.backbone.load_state_dict(encoder.backbone.state_dict())
        except RuntimeError:
            raise DataError(
                f"{checkpoint}: its backbone {type(encoder.backbone).__name__} does not match "
                f"model.backbone={self.hparams.backbone!r}"
            ) from None

    def parameter_groups(self) -> list[dict]:
        head = {"params": list(self.head.parameters())}
        if self.hparams.head_lr is not None:
            head["lr"] = self.hparams.head_lr
        return [{"params": self.trainable_parameters(self.backbone)}, head]

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) pooled backbone features."""
        return self.backbone(self.to_memory_format(image))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes) logits."""
        return self.head(self.features(image))

    def deployable_network(self) -> nn.Module:
        return FrameClassifier(self.backbone, self.head)

    def example_input_shape(self, datamodule) -> tuple[int, ...]:
        size = datamodule.image_size
        return (1, 3, size, size)

    def training_outputs(self, batch: Mapping) -> dict[str, torch.Tensor]:
        return {"logits": self(batch["image"])}

    def loss_terms(self, batch: Mapping, outputs: Mapping) -> dict[str, torch.Tensor]:
        return {"ce": F.cross_entropy(outputs["logits"], batch["label"], weight=self.ce_weights)}

    def evaluation_outputs(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, num_classes) class probabilities and (B,) labels."""
        return self(batch["image"]).float().softmax(dim=1), batch["label"]

    def predict_step(self, batch: Mapping, batch_idx: int) -> dict:
        """``{"features": (B, D), "prediction": (B,) int64, "video": list[str], "frame": (B,)}`` on the CPU."""
        features = self.features(batch["image"])
        return {
            "features": features.float().cpu(),
            "prediction": self.head(features).argmax(1).cpu(),
            "video": list(batch["video"]),
            "frame": batch["frame"].cpu(),
        }


class RelaxedPhaseMetrics(nn.Module):
    """Per-video predictions of one evaluation epoch, scored with the relaxed phase metrics.

    ``compute()``: ``{accuracy, precision, recall, jaccard}`` (corrected protocol), their SD over
    videos as ``<metric>_video_sd`` (:meth:`~distill.metrics.phase.PhaseReport.per_video_summary`), and
    the same under ``published/`` (the published MATLAB script's behaviour); empty before any video.
    """

    def __init__(self, dataset: str, tolerance_s: float) -> None:
        super().__init__()
        self.dataset, self.tolerance_s = dataset, tolerance_s
        self.videos: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def update(self, video: str, frames: np.ndarray, label: np.ndarray, prediction: np.ndarray) -> None:
        """One video's (T,) 25 fps frame indices, ground-truth and predicted phases."""
        self.videos[video] = (frames, label, prediction)

    def sync(self) -> None:
        """Under DDP, every process's videos (each scored a share; the sampler's padding repeats a video
        on two, counted once), in name order, on every process; a collective. Nothing to do otherwise."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        shares: list[dict | None] = [None] * dist.get_world_size()
        dist.all_gather_object(shares, self.videos)
        merged = {name: scored for share in shares for name, scored in share.items()}
        self.videos = {name: merged[name] for name in sorted(merged)}

    def report(self, mode: str = "corrected") -> PhaseReport:
        """The videos seen so far evaluated in ``mode`` (each at its own prediction rate)."""
        rates = {
            name: VIDEO_FPS / (np.diff(frames)[0] if len(frames) > 1 else 1)
            for name, (frames, _, _) in self.videos.items()
        }
        pairs = {name: (gt, pred) for name, (_, gt, pred) in self.videos.items()}
        return evaluate_phases(pairs, rates, self.dataset, mode, self.tolerance_s)

    def compute(self) -> dict[str, float]:
        self.sync()
        if not self.videos:
            return {}
        results = {}
        for mode, prefix in (("corrected", ""), ("published", "published/")):
            report = self.report(mode)
            values = {"accuracy": report.accuracy, **{m: report.mean(m) for m in ("precision", "recall", "jaccard")}}
            values |= {f"{name}_video_sd": std for name, (_, std) in report.per_video_summary().items()}
            results.update({f"{prefix}{name}": float(value) for name, value in values.items()})
        return results

    def reset(self) -> None:
        self.videos = {}


class TCNPhaseModule(DistillModuleBase):
    """Temporal phase model over per-frame features, one video per batch.

    Loss ``phase``: cross-entropy + ``smoothing_weight`` x truncated MSE smoothing, summed over
    stages (MS-TCN; the reference code used weight 1.0). Validation and test predict each video,
    score the videos with the relaxed metrics in both evaluation modes and log
    ``{val,test}/{accuracy,precision,recall,jaccard}`` (corrected protocol) and
    ``{val,test}/published/...`` (the published MATLAB script's behaviour); test also writes
    ``<video>-pred.txt`` files (``Frame<TAB>Phase`` at the feature rate) into a new
    ``phase_predictions/test`` folder of the run (never overwriting one).

    Args:
        in_dim: feature dimension D; ``None`` (default): read from the feature arrays when the
            run starts (the DataModule's ``feature_dim``) and recorded in the hyper-parameters.
        num_stages: 1: the causal single-stage TCN of the reference; > 1: MS-TCN.
        num_layers, channels, dropout, causal: TCN shape (reference: 12, 64, 0.5, causal); see
            :class:`~distill.models.temporal.TCNShape`.
        smoothing_weight: weight of the smoothing term (MS-TCN: 0.15).
        class_weights: optional per-phase cross-entropy weights.
        dataset: ``"cholec80"`` or ``"m2cai16"`` (phase names and the relaxed-boundary rules).
        tolerance_s: relaxed boundary in seconds (10 s, converted with the predictions' real rate).
        optimizer, lr_schedule: default Adam, constant; these and the other shared options: see
            :class:`DistillModuleBase`.
    """

    loss_term_names = ("phase",)
    default_loss_weights = {"phase": 1.0}
    progress_bar_metrics = ("accuracy", "precision", "recall", "jaccard")
    compiled_modules = ("tcn",)

    def __init__(
        self,
        in_dim: PositiveInt | None = None,
        num_classes: PositiveInt = 7,
        num_stages: PositiveInt = 1,
        num_layers: PositiveInt = 12,
        channels: PositiveInt = 64,
        dropout: NonNegativeFloat = 0.5,
        causal: bool = True,
        smoothing_weight: NonNegativeFloat = 0.15,
        class_weights: Sequence[float] | None = None,
        dataset: str = "cholec80",
        tolerance_s: PositiveFloat = 10.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_schedule: Literal["cosine", "constant"] = "constant",
        **kwargs,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_schedule=lr_schedule, **kwargs)
        if class_weights is not None and len(class_weights) != num_classes:
            raise DataError(f"model.class_weights: {len(class_weights)} weights for {num_classes} classes")
        self.tcn: nn.Module | None = None if in_dim is None else self.tcn_shape.build(in_dim, num_classes)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("ce_weights", weights, persistent=False)
        self.init_evaluation_metrics(lambda: RelaxedPhaseMetrics(dataset, tolerance_s))

    @property
    def tcn_shape(self) -> TCNShape:
        """The TCN's shape options (``num_stages``, ``num_layers``, ``channels``, ``dropout``, ``causal``)."""
        return TCNShape.from_hparams(self.hparams)

    def setup(self, stage: str) -> None:
        """The input width from the data: built here when ``in_dim`` is None, else checked."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "feature_dim") or stage == "predict":
            if self.tcn is None:
                raise DataError(
                    "model.in_dim: give the feature width, or run with a PhaseFeatureDataModule that reads it"
                )
            return
        width = datamodule.feature_dim
        if self.tcn is None:
            self.tcn = self.tcn_shape.build(width, self.hparams.num_classes)
            self.hparams["in_dim"] = width
        elif width != self.hparams.in_dim:
            raise DataError(
                f"{datamodule.features_dir}: {width} features per frame, model.in_dim is {self.hparams.in_dim}"
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, T) features -> (S, B, C, T) logits of every stage (S = 1 for a single stage)."""
        logits = self.tcn(features)
        return logits.unsqueeze(0) if logits.ndim == 3 else logits

    def deployable_network(self) -> nn.Module:
        return self.tcn

    def example_input_shape(self, datamodule) -> tuple[int, ...]:
        return (1, self.hparams.in_dim, 1500)  # 5 minutes at 5 fps

    def batch_size(self, batch: Mapping) -> int:
        return int(batch["label"].shape[0])

    def training_outputs(self, batch: Mapping) -> torch.Tensor:
        return self(batch["features"])

    def loss_terms(self, batch: Mapping, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "phase": phase_segmentation_loss(
                outputs, batch["label"], self.hparams.smoothing_weight, class_weights=self.ce_weights
            )
        }

    # -------------------------------------------------------------- evaluation
    def evaluation_outputs(self, batch: Mapping) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        """One video -> its name, (T,) frame indices, labels and predicted phases (:class:`RelaxedPhaseMetrics`)."""
        if batch["features"].shape[0] != 1:
            raise ValueError(f"TCNPhaseModule evaluates one video per batch, got {batch['features'].shape[0]}")
        prediction = self(batch["features"])[-1, 0].argmax(0)
        return (
            batch["video"][0],
            batch["frame"][0].cpu().numpy(),
            batch["label"][0].cpu().numpy(),
            prediction.cpu().numpy(),
        )

    def on_test_epoch_end(self) -> None:
        """Logs the metrics and writes the predictions (all processes' videos, from process 0) into a new
        folder of the run, with the evaluation protocol and results (``protocol.json``, ``evaluation.md``: :meth:`protocol`)."""
        self.test_metrics.sync()  # under DDP every process scored a share of the videos
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective under DDP
        if not self.trainer.is_global_zero:
            super().on_test_epoch_end()
            return
        folder = unique_path(root / "phase_predictions" / "test")
        folder.mkdir(parents=True)
        for name, (frames, _, pred) in self.test_metrics.videos.items():
            with atomic_write(child_path(folder, f"{name}-pred.txt")) as temporary:
                write_phase_file(temporary, frames, pred, self.hparams.dataset)
        if self.test_metrics.videos:
            report = self.test_metrics.report()
            protocol = self.protocol(report)
            write_text_atomic(folder / PROTOCOL_FILE, json.dumps(protocol | {"results": report.to_dict()}, indent=2))
            lines = [f"- {key}: {value}" for key, value in protocol_lines(protocol).items()]
            write_text_atomic(folder / "evaluation.md", "\n".join([*lines, "", report.format()]) + "\n")
        super().on_test_epoch_end()

    def protocol(self, report: PhaseReport) -> dict:
        """What a reader needs to compare the results with published ones: causal or offline temporal
        model, prediction rate, relaxed-boundary window (s and frames), the videos of each split."""
        h = self.hparams
        splits = getattr(getattr(self.trainer, "datamodule", None), "splits", None) or {}
        return {
            "temporal_model": self.tcn_shape.describe(),
            "prediction_fps": [float(f) for f in np.unique(report.fps)],
            "tolerance_s": h.tolerance_s,
            "tolerance_frames": report.window_frames(),
            "evaluation": "relaxed boundary, corrected MATLAB protocol (published/ metrics: the script's behaviour)",
            "dataset": h.dataset,
            "split": {part: list(videos) for part, videos in splits.items()},
            "test_videos": list(report.video_names),
        }
