"""MoCo v2 distilled from a frozen MoCo teacher (Ding, Liu, Li, MICCAI 2022: "Free Lunch for Surgical
Video Understanding by Distilling Self-Supervisions"): stage 2 of the recipe of :mod:`distill.modules.ssl`,
whose batches it trains on.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from distill.errors import DataError
from distill.losses.contrastive import contrastive_logits, similarity_distillation_loss
from distill.metrics.embedding import neighbour_overlap, similarity_kl
from distill.models.ssl import MemoryQueue
from distill.modules.ssl import MoCoModule
from distill.modules.teacher_runtime import FrozenTeachers, TeacherStudent
from distill.types import PositiveFloat

OVERLAP_NEIGHBOURS = 5  # k of the student-teacher neighbour overlap
#: The logit of a queue row no sample has filled yet: its softmax weight is exactly 0 in float32 (also
#: after a distillation temperature up to ~100), and it stays finite in float16.
UNFILLED_LOGIT = -1e4
AT_CHANCE = 0.9  # a teacher whose checkpoint's InfoNCE is above this share of ln(1 + K) learned (almost) nothing


class MoCoDistillModule(TeacherStudent, MoCoModule):
    """MoCo v2 student distilled from a frozen MoCo teacher over the (1 + K) similarity distributions.

    For view 1 / view 2 of each frame, the student's logits ``z_s = [q_s.k_s, q_s.Queue_s] / tau``
    and the teacher's ``z_t = [q_t.k_t, q_t.Queue_t] / tau`` (teacher embeddings of the same two
    views, against the teacher's own queue); ``distill`` = KL(softmax(z_t) || softmax(z_s)),
    batch mean. Both queues start empty-of-samples at row 0 and enqueue the keys of the same
    batch every step, so column j of both holds the same frame; columns not yet filled by any
    batch (random initial vectors) are left out of the distillation. The teacher stays in eval
    mode, is never updated, and its queue is never read from its checkpoint.

    Testing also logs the student's agreement with the teacher on the test frames
    (:mod:`distill.metrics.embedding`): ``test/teacher_kl`` (mean KL between their similarity
    distributions over the other test frames, at ``temperature``), ``test/teacher_overlap`` (share
    of the top-5 teacher neighbours among the student's; ``test/teacher_overlap_chance`` = 5 / (N - 1)),
    ``test/teacher_info_nce`` (the teacher checkpoint's ``train_info_nce``) and
    ``test/teacher_at_chance`` (1 when that is above 0.9 ln(1 + K): the teacher had nothing to give;
    the table flags the row).

    Loss: ``info_nce + 5 * distill`` (+ the probe). The reference implementation's total was
    ``2 * info_nce + 5 * distill``: ``loss_weights: {info_nce: 2, distill: 5, probe: 1}``
    reproduces it for comparison.

    Args:
        teacher_checkpoint: a MoCo checkpoint (e.g. stage 1's) or run directory (newest ``best*.ckpt``).
        teacher_sha256: its expected content hash (``None``: not checked; the hash is recorded in
            every checkpoint of the student either way).
        distill_temperature: extra KD softening T of the similarity logits (paper: 1, i.e. none).
        Other arguments: see :class:`MoCoModule`.
    """

    REPLICATED = (*MoCoModule.REPLICATED, "teacher_queue", "filled_rows")

    loss_term_names = ("info_nce", "distill", "probe")
    default_loss_weights = {"info_nce": 1.0, "distill": 5.0, "probe": 1.0}

    def __init__(
        self,
        teacher_checkpoint: str,
        teacher_sha256: str | None = None,
        distill_temperature: PositiveFloat = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.teacher_queue = MemoryQueue(self.hparams.proj_dim, self.hparams.queue_size)
        self.register_buffer("filled_rows", torch.zeros((), dtype=torch.long))
        self.teacher_info_nce: float | None = None  # read from the teacher's checkpoint
        self.attach_teachers(FrozenTeachers(teacher_checkpoint, "moco", [teacher_sha256]))

    def prepare_distillation(self) -> None:
        """Load the teacher and check that its projection dimension and queue size are the student's."""
        super().prepare_distillation()
        record, metadata = self.teachers.records[0], self.teachers.checkpoint_metadata[0]
        recorded = metadata.get("hyper_parameters") or {}
        self.teacher_info_nce = metadata.get("train_info_nce")
        teacher_dim = self.teachers.networks[0].head.out_dim
        problems = []
        if teacher_dim != self.hparams.proj_dim:
            problems.append(f"projection dimension {teacher_dim} vs the student's proj_dim {self.hparams.proj_dim}")
        if "queue_size" in recorded and int(recorded["queue_size"]) != self.hparams.queue_size:
            problems.append(
                f"queue size {recorded['queue_size']} vs the student's queue_size {self.hparams.queue_size}"
            )
        if problems:
            raise DataError(f"{record.checkpoint}: teacher {' and '.join(problems)}")

    def training_outputs(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """Student outputs plus ``teacher_logits`` (B, 1 + K) over the teacher's queue as it is and
        the teacher's ``teacher_keys`` (B, proj_dim)."""
        outputs = super().training_outputs(batch)
        view_q, view_k = (self.to_memory_format(v) for v in batch["views"])
        (embeddings,), _ = self.teachers(torch.cat([view_q, view_k]))  # eval mode: one pass for both views
        teacher_query, teacher_keys = embeddings.float().chunk(2)
        outputs["teacher_logits"] = contrastive_logits(
            teacher_query, teacher_keys, self.teacher_queue(), self.hparams.temperature
        )
        outputs["teacher_keys"] = teacher_keys
        return outputs

    @torch.no_grad()
    def enqueue_keys(self, outputs: Mapping[str, torch.Tensor]) -> None:
        """Both queues take this batch's keys in the same rows; ``filled_rows`` counts the rows filled."""
        super().enqueue_keys(outputs)
        teacher_keys = outputs["teacher_keys"]
        self.teacher_queue.enqueue(teacher_keys)
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.filled_rows.add_(world_size * teacher_keys.shape[0]).clamp_(max=self.queue.size)

    def loss_terms(self, batch: Mapping, outputs: Mapping) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, outputs)
        # the positive and the queue rows holding real samples (filled before this batch: its keys are
        # enqueued after the loss); the others masked out (their softmax weight is exactly 0) rather
        # than sliced off, so no step waits for the host to read the count
        logits = outputs["logits"]
        unfilled = torch.arange(logits.shape[1], device=logits.device) > self.filled_rows
        student, teacher = (x.masked_fill(unfilled, UNFILLED_LOGIT) for x in (logits, outputs["teacher_logits"]))
        terms["distill"] = similarity_distillation_loss(student, teacher, self.hparams.distill_temperature)
        return terms

    def held_out_embeddings(self, batch: Mapping, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student's embeddings and the teacher's (``"teacher"``, when it is loaded) of the same frames."""
        embeddings = super().held_out_embeddings(batch, features)
        if self.teachers.loaded:  # a test run on its own holds the student only
            (embeddings["teacher"],), _ = self.teachers(self.to_memory_format(batch["image"]))
        return embeddings

    def learning_metrics(self, held_out: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Plus the agreement with the teacher on the test frames and the teacher's own InfoNCE."""
        metrics = super().learning_metrics(held_out)
        if "teacher" in held_out and held_out["student"].shape[0] > 1:
            student, teacher = held_out["student"], held_out["teacher"].float()
            metrics["teacher_kl"] = similarity_kl(teacher, student, self.hparams.temperature)
            metrics["teacher_overlap"] = neighbour_overlap(teacher, student, OVERLAP_NEIGHBOURS)
            metrics["teacher_overlap_chance"] = min(1.0, OVERLAP_NEIGHBOURS / (student.shape[0] - 1))
        if self.teacher_info_nce is not None:
            metrics["teacher_info_nce"] = self.teacher_info_nce
            metrics["teacher_at_chance"] = float(self.teacher_info_nce > AT_CHANCE * metrics["info_nce_chance"])
        return metrics
