"""Self-supervised pre-training on surgical frames: MoCo v2, and MoCo v2 distilled from a frozen
MoCo teacher (Ding, Liu, Li, MICCAI 2022: "Free Lunch for Surgical Video Understanding by
Distilling Self-Supervisions").

Batches come from :class:`data_modules.surgical.SurgicalSSLDataModule`: training
``{"views": [view1, view2], "label": (B,) int64, ...}`` with views (B, 3, S, S) ImageNet-normalised
and label the phase (-1 for unlabelled frames); validation/test ``{"image": (B, 3, S, S),
"label": (B,)}`` labelled frames, scored by the online linear probe.

The recipe:

1. *Semantic-preserving teacher*: :class:`MoCoModule` on the public ImageNet backbone with
   ``freeze_backbone=True`` (batch-norm statistics frozen too): only the projection head learns
   the surgical similarity structure.
2. *Student*: :class:`MoCoDistillModule`, a randomly initialised MoCo v2 trained with
   ``info_nce + 5 * distill``, ``distill`` = KL(teacher || student) over the (1 + K) similarity
   distributions of the same two views against queues holding the same samples.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from distill.errors import DataError
from distill.losses.contrastive import contrastive_logits, info_nce_loss, similarity_distillation_loss
from distill.metrics.embedding import info_nce_chance, knn_accuracy, neighbour_overlap, similarity_kl
from distill.models.backbones import feature_dim
from distill.models.ssl import (
    MemoryQueue,
    MoCoEncoder,
    batch_shuffle_ddp,
    batch_unshuffle_ddp,
    build_moco_encoder,
    cosine_momentum,
    queue_batch_problem,
    update_momentum,
)
from distill.modules.base import DistillModuleBase
from distill.modules.checkpoints import load_state
from distill.modules.teachers import FrozenTeachers, TeacherStudent
from distill.types import ClosedUnitInterval, PositiveFloat, PositiveInt

BackboneWeights = str | None  # None (random init), "public", or a weights file

__all__ = ["MoCoDistillModule", "MoCoEncoder", "MoCoModule"]

KNN_NEIGHBOURS = 10  # k of the test k-NN accuracy of the projection embeddings
OVERLAP_NEIGHBOURS = 5  # k of the student-teacher neighbour overlap
#: The logit of a queue row no sample has filled yet: its softmax weight is exactly 0 in float32 (also
#: after a distillation temperature up to ~100), and it stays finite in float16.
UNFILLED_LOGIT = -1e4
AT_CHANCE = 0.9  # a teacher whose checkpoint's InfoNCE is above this share of ln(1 + K) learned (almost) nothing


def video_codes(videos: Sequence[str], device: torch.device) -> torch.Tensor:
    """(B,) int64 codes of video names, the same in every process (CRC-32), for grouping frames."""
    return torch.tensor([zlib.crc32(v.encode()) for v in videos], dtype=torch.long, device=device)


class MoCoModule(DistillModuleBase):
    """MoCo v2 (query encoder, momentum key encoder, queue, InfoNCE) with an online linear probe.

    Loss terms: ``info_nce`` (query of view 1 vs key of view 2 and the queue) and ``probe``
    (cross-entropy of a linear classifier on the *detached* backbone features of labelled frames;
    frames labelled -1 are ignored, and the probe never changes the backbone).

    What it learned, logged when testing (the checkpoint's values; :mod:`distill.metrics.embedding`):
    ``test/train_info_nce`` (mean InfoNCE of the checkpoint's training epoch, also saved in the
    checkpoint as ``train_info_nce``), ``test/info_nce_chance`` (ln(1 + K), what an encoder that
    tells nothing apart scores) and ``test/knn_acc`` (k-NN phase accuracy of the projection
    embeddings of the test frames, neighbours from the other test videos only).

    Args:
        backbone, backbone_source: timm (or torchvision) network name.
        backbone_weights: None (random init), ``"public"`` (packaged ImageNet EfficientNet-Lite0)
            or a weights file (e.g. torchvision's ``resnet50-0676ba61.pth``).
        proj_hidden_dim, proj_dim: MLP head (paper: 2048-2048-128).
        proj_batch_norm: batch norm after the head's hidden layer (MoCo v3; see
            :class:`~distill.models.ssl.ProjectionHead`). Off in the paper; short runs need it.
        queue_size: K negatives; a multiple of the global batch size (checked when fitting).
        temperature: tau of the contrastive logits (MoCo v2: 0.2).
        momentum: key-encoder EMA momentum (0.999); with ``momentum_schedule="cosine"`` it rises
            from ``momentum`` to ``final_momentum`` over the run (BYOL).
        freeze_backbone: train only the projection head (stage 1, the semantic-preserving
            teacher); ``freeze_bn_stats`` also keeps the backbone's batch-norm statistics.
        shuffle_bn: shuffle the key encoder's batch across processes under DDP (MoCo's
            shuffle-BN). For SyncBN instead, set ``trainer.sync_batchnorm: true`` (GPUs) and
            ``shuffle_bn: false``.
        num_classes: phases of the linear probe (Cholec80: 7, M2CAI16: 8).
        probe_lr: the probe's learning rate (its own parameter group, no weight decay); the probe's
            accuracy on labelled frames is logged as ``val/probe_acc`` and ``test/probe_acc``.
        optimizer: default SGD; it and the other shared options: see :class:`DistillModuleBase`.
    """

    loss_term_names = ("info_nce", "probe")
    default_loss_weights = {"info_nce": 1.0, "probe": 1.0}
    network_family = "moco"
    progress_bar_metrics = ("probe_acc",)

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_source: Literal["timm", "torchvision"] = "timm",
        backbone_weights: BackboneWeights = None,
        proj_hidden_dim: PositiveInt = 2048,
        proj_dim: PositiveInt = 128,
        proj_batch_norm: bool = False,
        queue_size: PositiveInt = 2048,
        temperature: PositiveFloat = 0.2,
        momentum: ClosedUnitInterval = 0.999,
        momentum_schedule: Literal["constant", "cosine"] = "constant",
        final_momentum: ClosedUnitInterval = 1.0,
        freeze_backbone: bool = False,
        freeze_bn_stats: bool = True,
        shuffle_bn: bool = True,
        num_classes: PositiveInt = 7,
        probe_lr: PositiveFloat = 0.1,
        optimizer: OptimizerCallable = torch.optim.SGD,
        **kwargs,
    ) -> None:
        super().__init__(optimizer=optimizer, **kwargs)
        self.encoder_q = build_moco_encoder(
            backbone, backbone_source, proj_hidden_dim, proj_dim, backbone_weights, proj_batch_norm
        )
        if freeze_backbone:
            self.encoder_q.backbone.requires_grad_(False)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.queue = MemoryQueue(proj_dim, queue_size)
        self.probe = nn.Linear(feature_dim(self.encoder_q.backbone), num_classes)
        self.init_evaluation_metrics(
            lambda: MetricCollection({"probe_acc": MulticlassAccuracy(num_classes, average="micro")})
        )
        # this training epoch's InfoNCE and online-probe accuracy (all processes); no NaN check: that
        # would be a host sync per step, and a non-finite loss stops the run anyway (NonFiniteLossWatch)
        self.epoch_info_nce = MeanMetric(nan_strategy="disable")
        self.train_probe_acc = MeanMetric(nan_strategy="disable")
        self.checkpoint_info_nce: float | None = None  # the loaded checkpoint's
        self.held_out: list[dict[str, torch.Tensor]] = []  # test embeddings, per batch
        if self.channels_last:
            self.encoder_q, self.encoder_k = (
                e.to(memory_format=torch.channels_last) for e in (self.encoder_q, self.encoder_k)
            )
        self.train()  # Lightning keeps the modes set here: frozen batch-norm statistics start frozen

    # ------------------------------------------------------------------ set-up
    def train(self, mode: bool = True) -> MoCoModule:
        """Frozen backbones (query and key) keep their batch-norm statistics when ``freeze_bn_stats``."""
        super().train(mode)
        if self.hparams.freeze_backbone and self.hparams.freeze_bn_stats:
            self.encoder_q.backbone.eval()
            self.encoder_k.backbone.eval()
        return self

    def setup(self, stage: str) -> None:
        if stage == "fit":
            problem = queue_batch_problem(self.queue.size, self.trainer.datamodule.batch_size, self.trainer.world_size)
            if problem:
                raise DataError(f"model.queue_size={self.queue.size} {problem}")

    def parameter_groups(self) -> list[dict]:
        probe = {"params": list(self.probe.parameters()), "lr": self.hparams.probe_lr, "weight_decay": 0.0}
        return [{"params": self.trainable_parameters(self.encoder_q)}, probe]

    def deployable_network(self) -> nn.Module:
        return self.encoder_q.backbone

    def example_input_shape(self, datamodule) -> tuple[int, ...]:
        size = datamodule.hparams.image_size
        return (1, 3, size, size)

    def batch_size(self, batch: Mapping) -> int:
        return int(batch["label"].shape[0])

    # ---------------------------------------------------------------- training
    def current_momentum(self) -> float:
        if self.hparams.momentum_schedule == "constant":
            return self.hparams.momentum
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return cosine_momentum(self.global_step, total, self.hparams.momentum, self.hparams.final_momentum)

    @torch.no_grad()
    def encode_keys(self, view: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, proj_dim) keys of the momentum encoder (shuffle-BN under DDP)."""
        if self.hparams.shuffle_bn:
            view, unshuffle = batch_shuffle_ddp(view)
        keys = self.encoder_k(view)
        return batch_unshuffle_ddp(keys, unshuffle) if self.hparams.shuffle_bn else keys

    def training_outputs(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """Query features/embeddings of view 1, keys of view 2, ``logits`` (B, 1 + K); enqueues the keys.

        The queue is read (a copy) before the keys are enqueued, so the logits use the negatives
        of the previous steps only.
        """
        view_q, view_k = (self.to_memory_format(v) for v in batch["views"])
        features = self.encoder_q.backbone(view_q)
        query = self.encoder_q.embed(features)
        update_momentum(self.encoder_q, self.encoder_k, self.current_momentum())
        keys = self.encode_keys(view_k)
        logits = contrastive_logits(query, keys, self.queue(), self.hparams.temperature)
        self.queue.enqueue(keys)
        return {"features": features, "query": query, "keys": keys, "logits": logits}

    def probe_loss(self, features: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the probe on the labelled frames (label >= 0) of detached (B, D) features:
        the mean over those frames, 0 (with the probe in the graph, for DDP) when there are none.
        Weighted rather than indexed, so no step waits for the host to count them."""
        logits = self.probe(features.detach())
        labelled = (label >= 0).float()
        per_frame = F.cross_entropy(logits, label.clamp(min=0), reduction="none")
        self.train_probe_acc.update((logits.argmax(1) == label).float(), labelled)
        self.log("train/probe_acc", self.train_probe_acc, on_step=False, on_epoch=True)
        return (per_frame * labelled).sum() / labelled.sum().clamp(min=1.0)

    def loss_terms(self, batch: Mapping, outputs: Mapping) -> dict[str, torch.Tensor]:
        info_nce = info_nce_loss(outputs["logits"])
        self.epoch_info_nce.update(info_nce.detach())
        return {"info_nce": info_nce, "probe": self.probe_loss(outputs["features"], batch["label"])}

    def on_train_epoch_start(self) -> None:
        self.epoch_info_nce.reset()

    def weights_info_nce(self) -> float | None:
        """Mean InfoNCE of the epoch that produced the current weights: the epoch trained so far in
        this process, else the loaded checkpoint's (None when neither exists)."""
        trained = self.epoch_info_nce.update_count > 0
        return float(self.epoch_info_nce.compute()) if trained else self.checkpoint_info_nce

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Also records ``train_info_nce``: the mean InfoNCE of the epoch so far (None before a step)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["train_info_nce"] = self.weights_info_nce()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Reads ``train_info_nce``, and forgets the InfoNCE of any epoch trained in this process:
        after loading, ``test/train_info_nce`` is the loaded weights' epoch (in a ``fit`` then
        ``test(ckpt_path="best")`` as in a separate ``distill test``)."""
        self.checkpoint_info_nce = checkpoint.get("train_info_nce")
        self.epoch_info_nce.reset()

    # -------------------------------------------------------------- evaluation
    def evaluation_outputs(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """Probe logits (B, num_classes) and labels (B,) of labelled frames."""
        return self.probe(self.encoder_q.backbone(self.to_memory_format(batch["image"]))), batch["label"]

    def held_out_embeddings(self, batch: Mapping, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, proj_dim) unit-norm embeddings of test frames for the learning metrics: ``{"student": ...}``."""
        return {"student": self.encoder_q.embed(features)}

    def on_test_epoch_start(self) -> None:
        self.held_out = []

    def test_step(self, batch: Mapping, batch_idx: int) -> None:
        """The probe's accuracy, and the embeddings, labels and video codes of the frames (``held_out``)."""
        features = self.encoder_q.backbone(self.to_memory_format(batch["image"]))
        self.test_metrics.update(self.probe(features), batch["label"])
        embeddings = self.held_out_embeddings(batch, features)
        self.held_out.append(
            {**embeddings, "label": batch["label"], "video": video_codes(batch["video"], batch["label"].device)}
        )

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        held_out = (
            {key: torch.cat([b[key] for b in self.held_out]) for key in self.held_out[0]} if self.held_out else {}
        )
        if self.trainer.world_size > 1 and held_out:
            held_out = {key: value.flatten(0, 1) for key, value in self.all_gather(held_out).items()}
        self.held_out = []
        for name, value in self.learning_metrics(held_out).items():
            self.log(f"test/{name}", torch.tensor(value, dtype=torch.float32), sync_dist=False)

    def learning_metrics(self, held_out: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """What pre-training learned: InfoNCE of the tested weights' epoch vs chance, k-NN accuracy
        of the test embeddings."""
        info_nce = self.weights_info_nce()
        metrics = {"info_nce_chance": info_nce_chance(self.queue.size)}
        if info_nce is not None:
            metrics["train_info_nce"] = info_nce
        labelled = held_out["label"] >= 0 if held_out else None
        if held_out and int(labelled.sum()) > 1:
            metrics["knn_acc"] = knn_accuracy(  # in row blocks, on the device
                held_out["student"][labelled], held_out["label"][labelled], held_out["video"][labelled], KNN_NEIGHBOURS
            )
        return {k: v for k, v in metrics.items() if not math.isnan(v)}


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
        teacher_sha256: its expected content hash (recorded automatically when absent).
        distill_temperature: extra KD softening T of the similarity logits (paper: 1, i.e. none).
        Other arguments: see :class:`MoCoModule`.
    """

    loss_term_names = ("info_nce", "distill", "probe")
    default_loss_weights = {"info_nce": 1.0, "distill": 5.0, "probe": 1.0}
    single_teacher = True

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
        self.attach_teachers(FrozenTeachers([teacher_checkpoint], "moco", [teacher_sha256]))

    def prepare_distillation(self) -> None:
        """Load the teacher and check that its projection dimension and queue size are the student's."""
        super().prepare_distillation()
        record = self.teachers.records()[0]
        state = load_state(Path(record.checkpoint))
        recorded = state.get("hyper_parameters") or {}
        self.teacher_info_nce = state.get("train_info_nce")
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
        """Student outputs plus ``teacher_logits`` (B, 1 + K) over the teacher's queue, both queues
        enqueued from this batch."""
        outputs = super().training_outputs(batch)
        view_q, view_k = (self.to_memory_format(v) for v in batch["views"])
        (embeddings,), _ = self.teachers(torch.cat([view_q, view_k]))  # eval mode: one pass for both views
        teacher_query, teacher_keys = embeddings.float().chunk(2)
        outputs["teacher_logits"] = contrastive_logits(
            teacher_query, teacher_keys, self.teacher_queue(), self.hparams.temperature
        )
        outputs["teacher_keys"] = teacher_keys
        self.teacher_queue.enqueue(teacher_keys)
        outputs["filled_rows"] = self.filled_rows.clone()  # before this batch's keys (a device scalar)
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.filled_rows.add_(world_size * teacher_keys.shape[0]).clamp_(max=self.queue.size)
        return outputs

    def loss_terms(self, batch: Mapping, outputs: Mapping) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(batch, outputs)
        # the positive and the queue rows holding real samples; the others masked out (their softmax
        # weight is exactly 0) rather than sliced off, so no step waits for the host to read the count
        logits = outputs["logits"]
        unfilled = torch.arange(logits.shape[1], device=logits.device) > outputs["filled_rows"]
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
