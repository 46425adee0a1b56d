"""Prostate segmentation, supervised: the teachers and the students without KD (:class:`SegmentationModule`).
A student distilled from teachers builds on it: :mod:`distill.modules.seg_distill`.

Batches come from :class:`data_modules.prostate.ProstateDataModule`:
training ``{"image": (B, S, H, W), "label": (B, H, W)}`` (S adjacent slices as channels), and
optionally ``"labeled": (B,)`` bool (False: the slice has no mask, its label is a placeholder);
validation/test/predict one volume per step ``{"image": (D, S, H, W), "label": (D, H0, W0),
"spacing": (3,), "site", "case", "image_path", "affine"}``, evaluated in 3D at the original
resolution.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from monai.transforms import KeepLargestConnectedComponent
from torch import nn
from torch.nn import functional as F

from distill.errors import DataError
from distill.formats.sites import PROSTATE_SITES
from distill.losses import DiceLoss, LovaszLoss, over_labelled
from distill.metrics.calibration import (
    CALIBRATION_FILE,
    N_BINS,
    ece_of_bins,
    foreground_probability,
    reliability_bins,
    reliability_record,
)
from distill.metrics.segmentation import PerGroupVolumeMetrics, volume_class_dice_hd95
from distill.models import build_segmentation_network, init_output_prior
from distill.modules.base import DistillModuleBase
from distill.types import NonNegativeFloat, PositiveFloat, PositiveInt
from distill.utils import write_text_atomic

# Network options as typed values, so command-line overrides such as ``width=16`` arrive as numbers.
NetworkKwargs = dict[str, int | float | bool | str | list[int]]


class SegmentationModule(DistillModuleBase):
    """Supervised 2.5D segmentation: Dice + Lovasz (+ optional cross-entropy) on one network.

    Args:
        network: name in :data:`distill.models.SEGMENTATION_NETWORKS`; ``network_kwargs`` its options.
        in_channels: input channels: the data's ``channels`` x ``num_slices``.
        num_classes: background + the data's classes (2 for the whole gland, 3 for zonal PZ / TZ).
        class_names: names of the foreground classes for per-class metrics (``val/dice_PZ``);
            None: the data's when fitting or testing. ``distill fit`` links these three from the
            DataModule (:mod:`distill.data_links`): a YAML leaves them out.
        loss_weights: weight per named term; terms here: ``dice``, ``lovasz``, ``ce``.
            It and the optimiser, schedule and ``channels_last``: see :class:`DistillModuleBase`.
        lovasz_mode: ``"softmax"`` (multi-class Lovasz-softmax) or ``"hinge"`` (binary).
        report_sites: groups for per-site test metrics (``test/dice/<SITE>``); the sites of the
            data read are added when fitting or testing.
        eval_batch_size: slices per forward pass when predicting a whole volume.
        largest_component: keep only the largest 3D connected component of the prediction.
        foreground_prior: the network starts predicting about this foreground probability
            (the output bias: :func:`distill.models.init_output_prior`), so no seed starts with
            foreground everywhere, where soft Dice barely trains. Set it near the task's
            foreground fraction (default 0.01; the gland is 1.4 % of the demo's training pixels):
            Adam moves the bias about ``lr`` per step, so a far-off prior slows the start.
            ``None`` keeps the random output layer, bias included.
        foreground_prior_weight_std: the output weights under the prior bias: None (default)
            keeps the network's own random weights; a number draws them from normal(0, std)
            (RetinaNet: 0.01); 0 zeroes them, which leaves every earlier layer without gradient
            at the first step and, with Adam, the head's weights at most ~``lr`` per step (on one
            real patient such runs fell apart after their best epoch; README).
    """

    loss_term_names = ("dice", "lovasz", "ce")
    default_loss_weights = {"dice": 1.0, "lovasz": 1.0}
    network_family = "segmentation"
    progress_bar_metrics = ("dice",)
    compiled_modules = ("net",)

    def __init__(
        self,
        network: str = "unet",
        network_kwargs: NetworkKwargs | None = None,
        in_channels: PositiveInt = 3,
        num_classes: PositiveInt = 2,
        lovasz_mode: Literal["softmax", "hinge"] = "softmax",
        lovasz_per_image: bool = False,
        report_sites: Sequence[str] = PROSTATE_SITES,
        eval_batch_size: PositiveInt = 32,
        largest_component: bool = False,
        class_names: list[str] | None = None,
        foreground_prior: PositiveFloat | None = 0.01,
        foreground_prior_weight_std: NonNegativeFloat | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.net = build_segmentation_network(network, in_channels, num_classes, **(network_kwargs or {}))
        if foreground_prior is not None:
            init_output_prior(self.net, num_classes, foreground_prior, foreground_prior_weight_std)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.dice_loss = DiceLoss()
        self.lovasz_loss = LovaszLoss(mode=lovasz_mode, per_image=lovasz_per_image)
        self.eval_batch_size = eval_batch_size
        foreground = list(range(1, num_classes))
        self.keep_largest = KeepLargestConnectedComponent(applied_labels=foreground) if largest_component else None
        if class_names is not None and len(class_names) != num_classes - 1:
            raise DataError(f"class_names: {len(class_names)} names for the {num_classes - 1} foreground classes")
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in foreground]
        self.report_sites = list(report_sites)
        self.init_evaluation_metrics(lambda: PerGroupVolumeMetrics(self.report_sites, self.class_names))

    def setup(self, stage: str) -> None:
        """Check the network against the data's input channels and classes
        (:class:`~distill.data_links.SegmentationData`: ``distill fit`` links them, a module built in
        Python may differ) before the first batch fails, and take the data's class and site names
        for the metrics."""
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None)
        for key in ("in_channels", "num_classes"):
            stated = getattr(data, key, None)
            if stated is not None and stated != self.hparams[key]:
                raise DataError(
                    f"model {key}={self.hparams[key]} differs from the data's {stated} "
                    f"(in a YAML leave model.init_args.{key} out: distill links it from the data)"
                )
        if self.hparams.class_names is None and getattr(data, "class_names", None) is not None:
            self.class_names = list(data.class_names)
        for metrics in (self.val_metrics, self.test_metrics):
            metrics.class_names = list(self.class_names)
            metrics.groups += [site for site in getattr(data, "site_names", ()) if site not in metrics.groups]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) slice stacks -> (B, num_classes, H, W) logits."""
        return self.net(self.to_memory_format(image))

    def deployable_network(self) -> nn.Module:
        return self.net

    def example_input_shape(self, datamodule) -> tuple[int, ...]:
        size = datamodule.image_size
        return (1, self.hparams.in_channels, size, size)

    # ----------------------------------------------------------------- training
    def training_outputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"logits": (B, num_classes, H, W)}``; subclasses add what their terms need."""
        return {"logits": self(batch["image"])}

    @staticmethod
    def labelled_slices(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """(B,) bool: the slices with a real mask (``batch["labeled"]``); ``None``: every slice has one.

        Unlabelled slices (semi-supervised training) carry an all-zero placeholder mask.
        """
        return batch.get("labeled")

    def loss_terms(self, batch: Mapping[str, torch.Tensor], outputs: Mapping) -> dict[str, torch.Tensor]:
        """Supervised terms of one training batch, over its labelled slices only (0 when it has
        none); subclasses add theirs."""
        label, logits, labelled = batch["label"], outputs["logits"], self.labelled_slices(batch)
        losses = {"dice": self.dice_loss, "lovasz": self.lovasz_loss, "ce": F.cross_entropy}
        return {
            name: over_labelled(loss, labelled, logits, label)
            for name, loss in losses.items()
            if name in self.loss_weights
        }

    # --------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict_volume(self, image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """(D, S, H, W) network inputs -> (D, H0, W0) int64 mask at the original in-plane ``size``."""
        return self.predict_and_calibrate(image, size)[0]

    @torch.no_grad()
    def predict_and_calibrate(
        self, image: torch.Tensor, size: Sequence[int], label: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_volume`'s mask, and the (3, N_BINS + 1) :func:`reliability_bins` of its voxels'
        foreground probabilities (before any largest-component step) against ``label`` (D, H0, W0)
        > 0 (all zero without ``label``)."""
        masks, bins = [], torch.zeros(3, N_BINS + 1, dtype=torch.float64, device=image.device)
        for chunk, rows in zip(image.split(self.eval_batch_size), torch.arange(len(image)).split(self.eval_batch_size)):
            logits = F.interpolate(self(chunk).float(), size=tuple(size), mode="bilinear", align_corners=False)
            masks.append(logits.argmax(dim=1))
            if label is not None:
                bins += reliability_bins(foreground_probability(logits), label[rows.to(label.device)] > 0).to(bins)
        mask = torch.cat(masks)
        if self.keep_largest is not None:
            mask = self.keep_largest(mask[None])[0]
        return torch.as_tensor(mask, dtype=torch.int64), bins

    def evaluation_outputs(
        self, volume: Mapping
    ) -> tuple[list[float], list[float], str, str, bool, float, torch.Tensor]:
        """One volume -> (Dice, HD95 in mm of each foreground class, site, image path, empty label, ECE of
        the foreground probability, its reliability bins): :class:`PerGroupVolumeMetrics`' update."""
        label = volume["label"]
        pred, bins = self.predict_and_calibrate(volume["image"], label.shape[-2:], label)
        dice, hd95 = volume_class_dice_hd95(pred, label, volume["spacing"].tolist(), self.hparams.num_classes)
        site = volume["site"]
        if site not in self.val_metrics.groups:
            raise DataError(
                f"{volume['image_path']}: site {site!r} is not in the model's report_sites {self.val_metrics.groups}"
            )
        return dice, hd95, site, volume["image_path"], not label.any(), ece_of_bins(bins), bins

    def on_test_epoch_end(self) -> None:
        """Also writes the test volumes' pooled reliability bins to ``calibration.json`` in the run's log
        folder (read by the tables' ``calibration.png``)."""
        bins = self.test_metrics.reliability()
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective under DDP
        if bins is not None and self.trainer.is_global_zero:
            write_text_atomic(folder / CALIBRATION_FILE, json.dumps(reliability_record(bins)))
        super().on_test_epoch_end()

    def predict_step(self, volume: Mapping, batch_idx: int) -> dict:
        """One volume -> ``{"mask": (D, H0, W0) uint8, "image_path", "site", "case"}``."""
        mask = self.predict_volume(volume["image"], volume["label"].shape[-2:])
        return {
            "mask": mask.to(torch.uint8).cpu(),
            "image_path": volume["image_path"],
            "site": volume["site"],
            "case": volume["case"],
        }
