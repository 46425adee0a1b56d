"""Prostate segmentation: supervised training (teachers, no-KD baselines) and teacher -> student KD.

Batches come from :class:`data_modules.prostate.ProstateDataModule`:
training ``{"image": (B, S, H, W), "label": (B, H, W)}`` (S adjacent slices as channels);
validation/test/predict one volume per step ``{"image": (D, S, H, W), "label": (D, H0, W0),
"spacing": (3,), "site", "case", "image_path", "affine"}``, evaluated in 3D at the original
resolution.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal, Union

import torch
from lightning.pytorch.cli import OptimizerCallable
from monai.transforms import KeepLargestConnectedComponent
from torch import nn
from torch.nn import functional as F

from data_modules.prostate import SITES
from distill.errors import DataError
from distill.losses import (
    AttentionTransferLoss,
    DiceLoss,
    FeatureMSELoss,
    KDLoss,
    LovaszLoss,
    check_loss_weights,
    weighted_sum,
)
from distill.metrics.segmentation import PerGroupVolumeMetrics, volume_dice_hd95
from distill.models import FeatureTaps, build_segmentation_network
from distill.modules.base import DistillModuleBase
from distill.modules.checkpoints import load_segmentation_network

# Network options as typed values, so command-line overrides such as ``width=16`` arrive as numbers.
NetworkKwargs = dict[str, Union[int, float, bool, str, list[int]]]


class SegmentationModule(DistillModuleBase):
    """Supervised 2.5D segmentation: Dice + Lovasz (+ optional cross-entropy) on one network.

    Args:
        network: name in :data:`distill.models.SEGMENTATION_NETWORKS`; ``network_kwargs`` its options.
        in_channels: adjacent slices per input (link it to the data: ``${data.init_args.num_slices}``).
        num_classes: 2 for the binary gland task (softmax over background/gland).
        loss_weights: weight per named term; terms here: ``dice``, ``lovasz``, ``ce``.
        lovasz_mode: ``"softmax"`` (multi-class Lovasz-softmax) or ``"hinge"`` (binary).
        report_sites: groups for per-site test metrics (``test/dice/<SITE>``).
        eval_batch_size: slices per forward pass when predicting a whole volume.
        largest_component: keep only the largest 3D connected component of the prediction.
    """

    supervised_terms = ("dice", "lovasz", "ce")

    def __init__(
        self,
        network: str = "unet",
        network_kwargs: NetworkKwargs | None = None,
        in_channels: int = 3,
        num_classes: int = 2,
        loss_weights: Mapping[str, float] | None = None,
        lovasz_mode: Literal["softmax", "hinge"] = "softmax",
        lovasz_per_image: bool = False,
        report_sites: Sequence[str] = SITES,
        eval_batch_size: int = 32,
        largest_component: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_schedule=lr_schedule, warmup_steps=warmup_steps, channels_last=channels_last)
        self.save_hyperparameters(ignore=["optimizer"])
        self.loss_weights = dict(loss_weights if loss_weights is not None else {"dice": 1.0, "lovasz": 1.0})
        check_loss_weights(self.loss_weights, self.available_loss_terms(), owner=type(self).__name__)
        self.net = build_segmentation_network(network, in_channels, num_classes, **(network_kwargs or {}))
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.dice_loss = DiceLoss()
        self.lovasz_loss = LovaszLoss(mode=lovasz_mode, per_image=lovasz_per_image)
        self.eval_batch_size = eval_batch_size
        self.keep_largest = KeepLargestConnectedComponent(applied_labels=[1]) if largest_component else None
        self.val_metrics = PerGroupVolumeMetrics(report_sites)
        self.test_metrics = PerGroupVolumeMetrics(report_sites)

    def available_loss_terms(self) -> tuple[str, ...]:
        return self.supervised_terms

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, S, H, W) slices -> (B, num_classes, H, W) logits."""
        return self.net(self.to_memory_format(image))

    # ----------------------------------------------------------------- training
    def loss_terms(self, batch: Mapping[str, torch.Tensor], logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms of one training batch; subclasses add theirs."""
        label = batch["label"]
        terms = {}
        if "dice" in self.loss_weights:
            terms["dice"] = self.dice_loss(logits, label)
        if "lovasz" in self.loss_weights:
            terms["lovasz"] = self.lovasz_loss(logits, label)
        if "ce" in self.loss_weights:
            terms["ce"] = F.cross_entropy(logits, label)
        return terms

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        terms = self.loss_terms(batch, logits)
        loss = weighted_sum(terms, self.loss_weights)
        batch_size = logits.shape[0]
        self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        return loss

    # --------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict_volume(self, image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """(D, S, H, W) network inputs -> (D, H0, W0) int64 mask at the original in-plane ``size``."""
        masks = []
        for chunk in image.split(self.eval_batch_size):
            logits = self(chunk)
            logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
            masks.append(logits.argmax(dim=1))
        mask = torch.cat(masks)
        if self.keep_largest is not None:
            mask = self.keep_largest(mask[None])[0]
        return torch.as_tensor(mask, dtype=torch.int64)

    def _evaluate_volume(self, volume: Mapping, metrics: PerGroupVolumeMetrics) -> None:
        label = volume["label"]
        pred = self.predict_volume(volume["image"], label.shape[-2:])
        dice, hd95 = volume_dice_hd95(pred, label, volume["spacing"].tolist())
        site = volume["site"]
        if site not in metrics.groups:
            raise DataError(f"{volume['image_path']}: site {site!r} is not in the model's report_sites {metrics.groups}")
        metrics.update(dice, hd95, site)

    def validation_step(self, volume: Mapping, batch_idx: int) -> None:
        self._evaluate_volume(volume, self.val_metrics)

    def test_step(self, volume: Mapping, batch_idx: int) -> None:
        self._evaluate_volume(volume, self.test_metrics)

    def on_validation_epoch_end(self) -> None:
        results = self.val_metrics.compute()
        self.log("val/dice", results["dice"].float(), prog_bar=True)
        self.log("val/hd95", results["hd95"].float())
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test/{name}": value.float() for name, value in self.test_metrics.compute().items()})
        self.test_metrics.reset()

    def predict_step(self, volume: Mapping, batch_idx: int) -> dict:
        """One volume -> ``{"mask": (D, H0, W0) uint8, "image_path", "site", "case"}``."""
        mask = self.predict_volume(volume["image"], volume["label"].shape[-2:])
        return {
            "mask": mask.to(torch.uint8).cpu(),
            "image_path": volume["image_path"],
            "site": volume["site"],
            "case": volume["case"],
        }


class SegDistillModule(SegmentationModule):
    """Student trained with a frozen teacher: supervised terms + temperature KL + feature distillation.

    The teacher is rebuilt from its checkpoint (architecture from the checkpoint's
    hyper-parameters), kept in eval mode and run without autograd. Its weights are not
    stored in the student's checkpoints (they are reloaded from ``teacher_checkpoint``).

    Args:
        teacher_checkpoint: a teacher ``.ckpt``/state-dict/safetensors file, or a run directory
            (its newest ``best*.ckpt`` is used).
        teacher_network, teacher_network_kwargs: only for plain state dicts without hyper-parameters.
        temperature: KD temperature T; the KL term is scaled by T^2.
        feature_pairs: ``[{"student": "<module path>", "teacher": "<module path>"}, ...]``: the
            intermediate features to match, captured with forward hooks.
        feature_loss: ``"attention"`` (attention transfer, no adapter) or ``"mse"`` (1x1 adapters).
        loss_weights: terms here: ``dice``, ``lovasz``, ``ce``, ``kd``, ``feature``.
    """

    distill_terms = ("kd", "feature")

    def __init__(
        self,
        teacher_checkpoint: str,
        network: str = "slim_unet",
        network_kwargs: NetworkKwargs | None = None,
        in_channels: int = 3,
        num_classes: int = 2,
        loss_weights: Mapping[str, float] | None = None,
        temperature: float = 4.0,
        feature_pairs: list[dict[str, str]] | None = None,
        feature_loss: Literal["attention", "mse"] = "attention",
        attention_p: float = 2.0,
        teacher_network: str | None = None,
        teacher_network_kwargs: NetworkKwargs | None = None,
        **kwargs,
    ) -> None:
        weights = dict(loss_weights if loss_weights is not None else {"dice": 1.0, "lovasz": 1.0, "kd": 1.0, "feature": 1.0})
        super().__init__(
            network=network,
            network_kwargs=network_kwargs,
            in_channels=in_channels,
            num_classes=num_classes,
            loss_weights=weights,
            **kwargs,
        )
        self.teacher = load_segmentation_network(teacher_checkpoint, teacher_network, teacher_network_kwargs)
        # The frozen teacher is in eval mode on purpose; Lightning would warn about it at every fit.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
        self.kd_loss = KDLoss(temperature=temperature)
        pairs = list(feature_pairs or [])
        for pair in pairs:
            if set(pair) != {"student", "teacher"}:
                raise DataError(f"feature_pairs entry {pair} must have exactly the keys 'student' and 'teacher'")
        if "feature" in self.loss_weights and not pairs:
            raise DataError("loss_weights has a 'feature' term but feature_pairs is empty")
        self.student_taps = FeatureTaps(self.net, [p["student"] for p in pairs], owner="student")
        self.teacher_taps = FeatureTaps(self.teacher, [p["teacher"] for p in pairs], owner="teacher")
        if feature_loss == "mse":
            student_channels, teacher_channels = self._feature_channels(in_channels)
            self.feature_loss = FeatureMSELoss(student_channels, teacher_channels)
        else:
            self.feature_loss = AttentionTransferLoss(p=attention_p)

    def available_loss_terms(self) -> tuple[str, ...]:
        return self.supervised_terms + self.distill_terms

    @torch.no_grad()
    def _feature_channels(self, in_channels: int) -> tuple[list[int], list[int]]:
        """Channels of the tapped features, from one dry run on a small input."""
        probe = torch.zeros(1, in_channels, 64, 64)
        self.net.eval()(probe)
        self.teacher(probe)
        self.net.train()
        return [f.shape[1] for f in self.student_taps.pop()], [f.shape[1] for f in self.teacher_taps.pop()]

    def train(self, mode: bool = True) -> SegDistillModule:
        """Switch the student; the teacher always stays in eval mode (frozen batch-norm statistics)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def loss_terms(self, batch: Mapping[str, torch.Tensor], logits: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, logits)
        student_features = self.student_taps.pop()
        with torch.no_grad():
            teacher_logits = self.teacher(self.to_memory_format(batch["image"]))
        teacher_features = self.teacher_taps.pop()
        if "kd" in self.loss_weights:
            terms["kd"] = self.kd_loss(logits, teacher_logits)
        if "feature" in self.loss_weights:
            terms["feature"] = self.feature_loss(student_features, teacher_features)
        return terms

    # The teacher is reloaded from ``teacher_checkpoint``; keep it out of student checkpoints.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
