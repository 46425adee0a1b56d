"""Procedure 2: several limit-trained teachers distilled into one adaptive student.

Teachers come from a manifest written by ``distill teachers`` (or a list of checkpoints); any
mix of architectures works, same-architecture teachers run as one batched pass. The KD target
mixes the teachers' softened predictions with per-pixel (or per-image) weights from a rule
(:mod:`distill.losses.multi_teacher`): ``mean``, ``confidence``, ``performance`` (CA-MKD) or
``learned`` (a gating network trained with the student: the adaptive student). The mean weight
of every teacher is logged as ``train/teacher_weight/<k>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from distill.errors import DataError
from distill.losses import over_labelled
from distill.losses.multi_teacher import WEIGHTING_RULES, gate_nll_loss, teacher_weights
from distill.models import TeacherGate
from distill.modules.seg_distill import SegDistillBase
from distill.types import PositiveInt


class MultiTeacherDistillModule(SegDistillBase):
    """K frozen teachers -> one student, combined by a weighting rule chosen in YAML.

    Args:
        teachers: a teacher manifest YAML (its hashes are checked) or a list of checkpoints.
        teacher_sha256: expected hash per teacher (default: the manifest's).
        weighting: ``mean``, ``confidence``, ``performance`` or ``learned``. The last two need
            labels: on unlabelled slices (``batch["labeled"]`` False) ``performance`` weighs the
            teachers equally, and ``learned`` uses its gate (which reads image and teacher
            predictions, not the label) while the ``gate`` term trains it on labelled slices only
            (0 in a batch without one).
        granularity: ``pixel`` (a weight per pixel) or ``sample`` (one per image).
        gate_width: hidden channels of the gating network (``learned``); its loss term is ``gate``.
        Other arguments: see :class:`~distill.modules.seg_distill.SegDistillBase`.
    """

    loss_term_names = SegDistillBase.loss_term_names + ("gate",)
    default_loss_weights = {"dice": 1.0, "lovasz": 1.0, "kd": 1.0}

    def __init__(
        self,
        weighting: Literal["mean", "confidence", "performance", "learned"] = "mean",
        granularity: Literal["pixel", "sample"] = "pixel",
        gate_width: PositiveInt = 16,
        network: str = "slim_unet",
        **kwargs,
    ) -> None:
        super().__init__(network=network, **kwargs)
        if weighting not in WEIGHTING_RULES:
            raise DataError(
                f"weighting: unknown teacher weighting rule {weighting!r}; available: {', '.join(WEIGHTING_RULES)}"
            )
        if (weighting == "learned") != ("gate" in self.loss_weights):
            raise DataError(
                "loss_weights: the 'gate' term trains the gate of weighting 'learned'; "
                "give it with that rule and only with it"
            )
        self.weighting = weighting
        self.granularity = granularity
        self.gate_width = gate_width

    def prepare_distillation(self) -> None:
        super().prepare_distillation()
        if self.weighting == "learned" and "gate" not in self.distill_heads:
            channels = self.hparams.in_channels + len(self.teachers) * self.hparams.num_classes
            self.distill_heads["gate"] = TeacherGate(
                channels, len(self.teachers), self.gate_width, per_sample=self.granularity == "sample"
            )

    def teacher_weights(self, batch: Mapping[str, torch.Tensor], outputs: dict) -> torch.Tensor:
        teacher_logits = outputs["teacher_logits"]
        gate_logits = None
        if self.weighting == "learned":
            probs = torch.softmax(teacher_logits, dim=2)
            gate_logits = self.distill_heads["gate"](batch["image"], probs)
        labelled = self.labelled_slices(batch)
        weights = teacher_weights(
            self.weighting, teacher_logits, batch["label"], gate_logits, self.granularity, labelled
        )
        outputs["teacher_weights"] = weights
        means = weights.detach().flatten(1).mean(1)
        self.log_dict({f"train/teacher_weight/{k}": w for k, w in enumerate(means)}, batch_size=weights.shape[1])
        return weights

    def loss_terms(self, batch: Mapping[str, torch.Tensor], outputs: dict) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, outputs)
        if self.weighting == "learned":
            weights = outputs.get("teacher_weights")
            if weights is None:  # no kd term this run
                weights = self.teacher_weights(batch, outputs)
            # weights first: with no labelled slice the zero term keeps the gate's gradient path
            terms["gate"] = over_labelled(
                lambda w, logits, label: gate_nll_loss(logits, w, label),
                self.labelled_slices(batch),
                weights,
                outputs["teacher_logits"],
                batch["label"],
                dims=(1, 1, 0),
            )
        return terms
