"""Teachers -> student distillation for prostate segmentation: :class:`SegDistillBase`, the student
network trained with K frozen teachers (KD and feature terms on top of the supervised ones), and
:class:`SegDistillModule`, procedure 1 (one well-trained teacher). Procedure 2, several teachers
mixed by a weighting rule: :mod:`distill.modules.multi_teacher`.

Batches and evaluation: those of :class:`~distill.modules.segmentation.SegmentationModule`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from distill.errors import DataError
from distill.losses.multi_teacher import teacher_weights
from distill.losses.registry import (
    FEATURE_LOSSES,
    LOGIT_LOSSES,
    LossConfig,
    build_feature_loss,
    choose_loss,
    logit_loss,
)
from distill.models import FeatureTaps
from distill.modules.segmentation import NetworkKwargs, SegmentationModule
from distill.modules.teacher_cache import attach_teacher_cache
from distill.modules.teacher_runtime import FrozenTeachers, TeacherStudent
from distill.types import PositiveFloat


class SegDistillBase(TeacherStudent, SegmentationModule):
    """Student segmentation network trained with K frozen teachers (the shared machinery).

    Loss terms: the supervised ``dice``, ``lovasz``, ``ce``, plus ``kd`` (the ``logit_loss``
    against the teachers' logits; :meth:`teacher_weights` says how they combine) and
    ``feature`` (the ``feature_loss`` on ``feature_pairs``, averaged over teachers). In a
    semi-supervised batch (``batch["labeled"]``, (B,) bool) the label terms cover the labelled
    slices only and ``kd`` / ``feature`` every slice; a batch without a labelled slice trains on
    the distillation terms alone.

    Teachers are :class:`~distill.modules.teacher_runtime.FrozenTeachers`, kept by
    :class:`~distill.modules.teacher_runtime.TeacherStudent`: loaded when fitting starts, never in
    the student's checkpoints, identified by content hash (``teacher_records`` in every checkpoint).
    Training-only parts (feature adapters) live in ``distill_heads`` and are dropped when a
    checkpoint is loaded for test or predict.

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
            FrozenTeachers(
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
        for record, out in zip(self.teachers.records, outputs):
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
            (its newest ``best*.ckpt`` when fitting starts; the file and its hash are recorded in
            every checkpoint of the student).
        teacher_sha256: expected hash of the teacher file (``None``: not checked, recorded).
        Other arguments: see :class:`SegDistillBase` and :class:`SegmentationModule`.
    """

    def __init__(
        self,
        teacher_checkpoint: str,
        teacher_sha256: str | None = None,
        network: str = "slim_unet",
        **kwargs,
    ) -> None:
        super().__init__(teachers=[teacher_checkpoint], teacher_sha256=[teacher_sha256], network=network, **kwargs)
