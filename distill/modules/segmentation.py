"""Prostate segmentation: supervised training (teachers, no-KD baselines) and teachers -> student KD.

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
from distill.losses.multi_teacher import teacher_weights
from distill.losses.registry import (
    FEATURE_LOSSES,
    LOGIT_LOSSES,
    LossConfig,
    build_feature_loss,
    choose_loss,
    logit_loss,
)
from distill.metrics.calibration import (
    CALIBRATION_FILE,
    N_BINS,
    ece_of_bins,
    foreground_probability,
    reliability_bins,
    reliability_record,
)
from distill.metrics.segmentation import PerGroupVolumeMetrics, volume_class_dice_hd95
from distill.models import FeatureTaps, build_segmentation_network, init_output_prior
from distill.modules.base import DistillModuleBase
from distill.modules.teacher_cache import attach_teacher_cache
from distill.modules.teachers import FrozenTeachers, TeacherStudent
from distill.types import NonNegativeFloat, PositiveFloat, PositiveInt
from distill.utils import write_text_atomic

# Network options as typed values, so command-line overrides such as ``width=16`` arrive as numbers.
NetworkKwargs = dict[str, int | float | bool | str | list[int]]


class SegmentationModule(DistillModuleBase):
    """Supervised 2.5D segmentation: Dice + Lovasz (+ optional cross-entropy) on one network.

    Args:
        network: name in :data:`distill.models.SEGMENTATION_NETWORKS`; ``network_kwargs`` its options.
        in_channels: input channels: the data's ``channels`` x ``num_slices`` (link it:
            ``${data.init_args.num_slices}`` for one MRI channel,
            ``${product:${data.init_args.channels},${data.init_args.num_slices}}`` for more).
        num_classes: background + the data's classes (2 for the whole gland, 3 for zonal PZ / TZ).
        class_names: names of the foreground classes for per-class metrics (``val/dice_PZ``);
            None: the data's (``class_names`` of the DataModule) when fitting or testing.
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
        """Check the network against the data (input channels = channels x slices, classes) before
        the first batch fails, and take the data's class and site names for the metrics."""
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None)
        hp = self.hparams
        channels = getattr(data, "in_channels", None)
        if channels is not None and channels != hp.in_channels:
            mri_channels = getattr(getattr(data, "hparams", None), "channels", 1)
            if mri_channels == 1:
                raise DataError(
                    f"model.init_args.in_channels={hp.in_channels} differs from data.init_args.num_slices={channels} "
                    "(the slices stacked as input channels); set in_channels: ${data.init_args.num_slices}"
                )
            raise DataError(
                f"model.init_args.in_channels={hp.in_channels} differs from data.init_args.channels x num_slices = "
                f"{mri_channels} x {channels // mri_channels} = {channels}; set in_channels: "
                "${product:${data.init_args.channels},${data.init_args.num_slices}}"
            )
        classes = getattr(data, "num_classes", None)
        if classes is not None and classes != hp.num_classes:
            raise DataError(
                f"model.init_args.num_classes={hp.num_classes} differs from the data's {classes} classes "
                f"(background + {', '.join(getattr(data, 'class_names', ()))} of data.init_args.labels); "
                f"set num_classes: {classes}"
            )
        if hp.class_names is None and getattr(data, "class_names", None) is not None:
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
        size = datamodule.hparams.image_size
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


class SegDistillBase(TeacherStudent, SegmentationModule):
    """Student segmentation network trained with K frozen teachers (the shared machinery).

    Loss terms: the supervised ``dice``, ``lovasz``, ``ce``, plus ``kd`` (the ``logit_loss``
    against the teachers' logits; :meth:`teacher_weights` says how they combine) and
    ``feature`` (the ``feature_loss`` on ``feature_pairs``, averaged over teachers). In a
    semi-supervised batch (``batch["labeled"]``, (B,) bool) the label terms cover the labelled
    slices only and ``kd`` / ``feature`` every slice; a batch without a labelled slice trains on
    the distillation terms alone.

    Teachers are :class:`~distill.modules.teachers.FrozenTeachers`, kept by
    :class:`~distill.modules.teachers.TeacherStudent`: loaded when fitting starts, never in the
    student's checkpoints, identified by content hash (``teacher_sha256`` in the student's
    hyper-parameters). Training-only parts (feature adapters) live in ``distill_heads`` and are
    dropped when a checkpoint is loaded for test or predict.

    Args:
        teachers: a teacher manifest YAML (its hashes are checked), one checkpoint file or run
            directory, or a list of them.
        teacher_sha256: expected content hash per teacher (``None``: the manifest's, else
            recorded, not checked).
        temperature: KD temperature T; the KL term is scaled by T^2.
        logit_loss: the ``kd`` term, by name (:data:`distill.losses.registry.LOGIT_LOSSES`):
            ``kd`` (Hinton KL to the teachers' weighted mixture) or ``channel_wise`` (channel-wise
            distillation of the logits, per teacher).
        feature_pairs: ``[{"student": "<module path>", "teacher": "<module path>"}, ...]``: the
            intermediate features to match, captured with forward hooks (same teacher path in
            every teacher).
        feature_loss: the ``feature`` term, by name or ``{name: ..., <option>: ...}``
            (:data:`distill.losses.registry.FEATURE_LOSSES`): ``attention`` (attention transfer,
            option ``p``), ``mse`` (a 1x1 adapter per teacher and layer), ``channel_wise``
            (adapters, option ``temperature``) or ``region_affinity`` (EMKD, needs no adapter).
        teacher_network, teacher_network_kwargs: only for plain state dicts without hyper-parameters.
        teacher_cache: file of cached teacher logits (built on first use; a relative path is inside
            the run's ``trainer.default_root_dir``): teachers then run once per training slice
            instead of every step; see :mod:`distill.modules.teacher_cache`.
        batched_teachers: run same-architecture teachers as one batched pass (default: on GPU only;
            slower than one by one on CPU). Teachers follow the ``channels_last`` switch.
        Other arguments: see :class:`SegmentationModule`.
    """

    loss_term_names = ("dice", "lovasz", "ce", "kd", "feature")
    default_loss_weights = {"dice": 1.0, "lovasz": 1.0, "kd": 1.0, "feature": 1.0}

    def __init__(
        self,
        teachers: str | Sequence[str],
        teacher_sha256: Sequence[str | None] | None = None,
        temperature: PositiveFloat = 4.0,
        logit_loss: LossConfig = "kd",
        feature_pairs: list[dict[str, str]] | None = None,
        feature_loss: LossConfig = "attention",
        teacher_network: str | None = None,
        teacher_network_kwargs: NetworkKwargs | None = None,
        teacher_cache: str | None = None,
        batched_teachers: bool | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.temperature = temperature
        self.logit_loss = choose_loss(logit_loss, LOGIT_LOSSES, "logit_loss")
        self.feature_loss = choose_loss(feature_loss, FEATURE_LOSSES, "feature_loss")
        pairs = list(feature_pairs or [])
        for pair in pairs:
            if set(pair) != {"student", "teacher"}:
                raise DataError(f"feature_pairs entry {pair} must have exactly the keys 'student' and 'teacher'")
        if "feature" in self.loss_weights and not pairs:
            raise DataError("loss_weights has a 'feature' term but feature_pairs is empty")
        if teacher_cache is not None and self.loss_weights.get("feature", 0) > 0:
            raise DataError(
                "teacher_cache: the cache holds teacher outputs only; drop the 'feature' loss term or the cache"
            )
        self.student_taps = FeatureTaps(self.net, [p["student"] for p in pairs], owner="student")
        self.teacher_feature_paths = [p["teacher"] for p in pairs]
        self.teacher_cache = teacher_cache
        self.distill_heads = nn.ModuleDict()  # training-only parts, built by prepare_distillation()
        overrides = (
            {"network": teacher_network, "network_kwargs": teacher_network_kwargs or {}} if teacher_network else {}
        )
        self.attach_teachers(
            FrozenTeachers.from_source(
                teachers,
                "segmentation",
                teacher_sha256,
                overrides=overrides,
                batched=batched_teachers,
                channels_last=self.channels_last,
            )
        )

    # ------------------------------------------------------------------ set-up
    def on_fit_start(self) -> None:
        """Build or read the teacher cache once the weights are on the accelerator (teachers included),
        so the teachers run there; before the first training batch is drawn."""
        super().on_fit_start()
        if self.teacher_cache is not None:
            cache = Path(self.trainer.default_root_dir) / self.teacher_cache  # an absolute path stays as it is
            attach_teacher_cache(
                cache, self.trainer.datamodule, self.teachers, self.eval_batch_size, self.trainer.strategy
            )

    def prepare_distillation(self) -> None:
        """Load the teachers, check them against the student, build the per-teacher feature losses."""
        super().prepare_distillation()
        student_features, teacher_features = self._dry_run()
        if self.loss_weights.get("feature", 0) > 0 and "feature" not in self.distill_heads:
            student_channels = [f.shape[1] for f in student_features]
            self.distill_heads["feature"] = nn.ModuleList(
                build_feature_loss(self.feature_loss, student_channels, [f.shape[1] for f in feats])
                for feats in teacher_features
            )

    @torch.no_grad()
    def _dry_run(self) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """One small input through student and teachers: checks their agreement, returns features.

        Runs during ``setup``, where Lightning already reports the accelerator as ``self.device`` but
        has not moved the weights: the probe goes where the student's parameters are."""
        in_channels, num_classes = self.hparams.in_channels, self.hparams.num_classes
        probe = torch.zeros(1, in_channels, 64, 64, device=next(self.net.parameters()).device)
        was_training = self.net.training
        self.net.eval()
        self.net(probe)
        self.net.train(was_training)
        student_features = self.student_taps.pop()
        try:
            outputs, teacher_features = self.teachers(probe, self.teacher_feature_paths)
        except RuntimeError as err:
            raise DataError(
                f"{self.teacher_files()}: teachers do not accept the student's "
                f"{in_channels}-channel input ({str(err).splitlines()[0][:120]})"
            ) from None
        for record, out in zip(self.teachers.records(), outputs):
            if out.shape[1] != num_classes:
                raise DataError(
                    f"{record.checkpoint}: teacher predicts {out.shape[1]} classes, the student {num_classes}"
                )
        return student_features, teacher_features

    # ---------------------------------------------------------------- training
    def training_outputs(self, batch: Mapping[str, torch.Tensor]) -> dict:
        """Student logits and features, and the teachers' logits ``(K, B, C, H, W)`` and features.

        With a teacher cache the batch carries ``teacher_logits`` (B, K, C, H, W), augmented
        together with the image, and the teachers do not run.
        """
        outputs = super().training_outputs(batch)
        outputs["student_features"] = self.student_taps.pop()
        if "teacher_logits" in batch:
            outputs["teacher_logits"] = batch["teacher_logits"].float().movedim(1, 0)
            outputs["teacher_features"] = None
            return outputs
        paths = self.teacher_feature_paths if self.loss_weights.get("feature", 0) > 0 else ()
        teacher_logits, teacher_features = self.teachers(self.to_memory_format(batch["image"]), paths)
        outputs["teacher_logits"] = torch.stack(teacher_logits).float()
        outputs["teacher_features"] = teacher_features
        return outputs

    def teacher_weights(self, batch: Mapping[str, torch.Tensor], outputs: Mapping) -> torch.Tensor:
        """(K, B, H, W) weight of each teacher in the KD target; here the plain mean."""
        return teacher_weights("mean", outputs["teacher_logits"])

    def loss_terms(self, batch: Mapping[str, torch.Tensor], outputs: Mapping) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, outputs)
        if "kd" in self.loss_weights:
            weights = self.teacher_weights(batch, outputs).detach()
            terms["kd"] = logit_loss(
                self.logit_loss, outputs["logits"], outputs["teacher_logits"], weights, self.temperature
            )
        if self.loss_weights.get("feature", 0) > 0:
            losses = self.distill_heads["feature"]
            regions = self.region_labels(batch, outputs)
            terms["feature"] = torch.stack(
                [
                    loss(outputs["student_features"], feats, regions)
                    for loss, feats in zip(losses, outputs["teacher_features"])
                ]
            ).mean()
        return terms

    def region_labels(self, batch: Mapping[str, torch.Tensor], outputs: Mapping) -> torch.Tensor:
        """(B, H, W) the masks a feature loss may read (EMKD region affinity): the label where the
        slice has one, else the teachers' mean prediction, so feature terms cover every slice."""
        labelled = self.labelled_slices(batch)
        if labelled is None or bool(labelled.all()):
            return batch["label"]
        predicted = outputs["teacher_logits"].softmax(dim=2).mean(dim=0).argmax(dim=1)
        return torch.where(labelled[:, None, None], batch["label"], predicted)


class SegDistillModule(SegDistillBase):
    """Procedure 1: one well-trained teacher -> lightweight student (Dice + Lovasz + T^2 KL + features).

    Args:
        teacher_checkpoint: a teacher ``.ckpt``/state-dict/safetensors file, or a run directory
            (its newest ``best*.ckpt`` when the student is created; the file and its hash are
            recorded in the student's hyper-parameters).
        teacher_sha256: expected hash of the teacher file (filled in automatically when absent).
        Other arguments: see :class:`SegDistillBase` and :class:`SegmentationModule`.
    """

    single_teacher = True

    def __init__(
        self,
        teacher_checkpoint: str,
        teacher_sha256: str | None = None,
        network: str = "slim_unet",
        **kwargs,
    ) -> None:
        super().__init__(teachers=[teacher_checkpoint], teacher_sha256=[teacher_sha256], network=network, **kwargs)
