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
2. *Student*: :class:`~distill.modules.ssl_distill.MoCoDistillModule`, a randomly initialised
   MoCo v2 trained with ``info_nce + 5 * distill``, ``distill`` = KL(teacher || student) over the
   (1 + K) similarity distributions of the same two views against queues holding the same samples.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from distill.errors import DataError
from distill.losses.contrastive import contrastive_logits, info_nce_loss
from distill.metrics.embedding import info_nce_chance, knn_accuracy
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
from distill.types import ClosedUnitInterval, PositiveFloat, PositiveInt

BackboneWeights = str | None  # None (random init), "public", or a weights file

__all__ = ["MoCoEncoder", "MoCoModule"]

KNN_NEIGHBOURS = 10  # k of the test k-NN accuracy of the projection embeddings


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

    A training batch runs in three steps, as in solo-learn:

    1. :meth:`update_momentum_encoders` (from ``on_train_batch_start``): each momentum-updated
       module of :attr:`momentum_pairs` (the key encoder) takes one EMA step toward the weights the
       optimizer left in its online module (the query encoder). Done at the start of a batch, not at
       the end of the one before: a checkpoint written at a batch's end resumes exactly.
    2. The loss (:class:`DistillModuleBase`'s ``training_step``: :meth:`training_outputs`, then
       :meth:`loss_terms`), against the queue as it was before this batch.
    3. :meth:`enqueue_keys`: this batch's keys replace the oldest rows of the queue.

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
    compiled_modules = ("encoder_q",)

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

    #: Top-level modules and buffers that every process updates alike, from all-gathered keys.
    REPLICATED = ("queue",)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """What DDP leaves alone (its hook for this): the buffers of :attr:`REPLICATED`, the queues,
        their pointers and counts, so it does not broadcast them from process 0 before every step
        (2 x 32 MB for the paper's two 65,536 x 128 queues); :meth:`on_fit_start` syncs them once."""
        return [name for name, _ in self.named_buffers() if name.split(".")[0] in self.REPLICATED]

    def on_fit_start(self) -> None:
        """Every process starts from process 0's queues (then they stay alike, see
        :attr:`_ddp_params_and_buffers_to_ignore`)."""
        super().on_fit_start()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            buffers = dict(self.named_buffers())
            for name in self._ddp_params_and_buffers_to_ignore:
                torch.distributed.broadcast(buffers[name], src=0)

    def parameter_groups(self) -> list[dict]:
        probe = {"params": list(self.probe.parameters()), "lr": self.hparams.probe_lr, "weight_decay": 0.0}
        return [{"params": self.trainable_parameters(self.encoder_q)}, probe]

    def deployable_network(self) -> nn.Module:
        return self.encoder_q.backbone

    def example_input_shape(self, datamodule) -> tuple[int, ...]:
        size = datamodule.image_size
        return (1, 3, size, size)

    def batch_size(self, batch: Mapping) -> int:
        return int(batch["label"].shape[0])

    # ---------------------------------------------------------------- training
    @property
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum-updated) module pairs: the query encoder and the key encoder."""
        return [(self.encoder_q, self.encoder_k)]

    def current_momentum(self) -> float:
        """The EMA momentum at this optimizer step (each micro-batch of an accumulated step: the same)."""
        if self.hparams.momentum_schedule == "constant":
            return self.hparams.momentum
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return cosine_momentum(self.global_step, total, self.hparams.momentum, self.hparams.final_momentum)

    def update_momentum_encoders(self) -> None:
        """Step 1 of a batch: each momentum-updated module of :attr:`momentum_pairs` takes one EMA
        step toward its online module, ``m * momentum_updated + (1 - m) * online``."""
        momentum = self.current_momentum()
        for online, momentum_updated in self.momentum_pairs:
            update_momentum(online, momentum_updated, momentum)

    def on_train_batch_start(self, batch: Mapping, batch_idx: int) -> None:
        self.update_momentum_encoders()

    def after_loss(self, batch: Mapping, outputs: Mapping[str, torch.Tensor]) -> None:
        """Step 3 of a batch (step 2: :class:`DistillModuleBase`'s training step): :meth:`enqueue_keys`."""
        self.enqueue_keys(outputs)

    @torch.no_grad()
    def enqueue_keys(self, outputs: Mapping[str, torch.Tensor]) -> None:
        """The batch's keys (``outputs["keys"]``, (B, proj_dim)) over the oldest queue rows."""
        self.queue.enqueue(outputs["keys"])

    @torch.no_grad()
    def encode_keys(self, view: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, proj_dim) keys of the momentum encoder (shuffle-BN under DDP)."""
        if self.hparams.shuffle_bn:
            view, unshuffle = batch_shuffle_ddp(view)
        keys = self.encoder_k(view)
        return batch_unshuffle_ddp(keys, unshuffle) if self.hparams.shuffle_bn else keys

    def training_outputs(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """Query features (B, D) and embeddings (B, proj_dim) of view 1, keys (B, proj_dim) of view 2 and
        ``logits`` (B, 1 + K) against the queue as it is: the negatives of the previous batches only
        (the keys enter the queue after the loss, :meth:`after_loss`)."""
        view_q, view_k = (self.to_memory_format(v) for v in batch["views"])
        features = self.encoder_q.backbone(view_q)
        query = self.encoder_q.embed(features)
        keys = self.encode_keys(view_k)
        logits = contrastive_logits(query, keys, self.queue(), self.hparams.temperature)
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
