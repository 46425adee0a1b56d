"""Small pieces of momentum-contrast self-supervision (MoCo v2): encoder, queue, head, EMA, shuffle-BN.

Each piece works in one process and under DDP: cross-process steps (queue gathering, batch
shuffling) run only when ``torch.distributed`` is initialised with more than one process, and
need the same per-process batch size on every rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from distill.models.backbones import build_backbone, feature_dim

__all__ = [
    "MemoryQueue",
    "MoCoEncoder",
    "ProjectionHead",
    "batch_shuffle_ddp",
    "batch_unshuffle_ddp",
    "build_moco_encoder",
    "concat_all_gather",
    "cosine_momentum",
    "update_momentum",
]


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """(B, ...) from each of P processes -> (P * B, ...) in rank order, without gradient.

    Returns ``tensor`` itself in a single process.
    """
    _, world_size = _world()
    if world_size == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def queue_batch_problem(queue_size: int, batch_size: int, world_size: int) -> str | None:
    """Why a queue of ``queue_size`` rows cannot take whole global batches of ``batch_size`` x
    ``world_size`` keys (every step must write whole batches to keep it aligned), naming the
    process counts that would work; None when it can."""
    if queue_size % (batch_size * world_size) == 0:
        return None
    worlds = [w for w in range(1, queue_size // batch_size + 1) if queue_size % (batch_size * w) == 0]
    shown = ", ".join(map(str, worlds[:8])) + (", ..." if len(worlds) > 8 else "")
    works = (
        f"with this batch size it works on {shown} processes"
        if worlds
        else "no process count works with this batch size; choose one that divides the queue size"
    )
    return (
        f"must be a multiple of the global batch (data.batch_size={batch_size} x {world_size} processes = "
        f"{batch_size * world_size}); {works}"
    )


class MemoryQueue(nn.Module):
    """FIFO queue of the last ``size`` keys (MoCo's dictionary of negatives), as module buffers.

    Buffers (saved in checkpoints): ``queue`` (size, dim), initialised with random unit vectors,
    and ``pointer`` (the row the next keys are written to; writes wrap around the end). Two queues
    enqueued from the same batches, starting from the same pointer, hold the same samples in the
    same rows.

    Args:
        dim: key dimension D.
        size: number of keys K. A module using the queue checks once, when fitting starts, that it
            is a multiple of the global batch size (:func:`queue_batch_problem`), so each batch
            fills whole rows from the row after the previous batch's.
    """

    queue: Tensor
    pointer: Tensor

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"MemoryQueue: dim and size must be >= 1, got {dim} and {size}")
        self.register_buffer("queue", nn.functional.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def forward(self) -> Tensor:
        """(K, D): a copy of the keys, safe to use in a loss before the next :meth:`enqueue`."""
        return self.queue.clone()

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write (B, D) keys (unit L2 norm, from every process under DDP) over the oldest ones."""
        keys = concat_all_gather(keys.detach())
        # rows pointer .. pointer + n - 1 (modulo size), computed on the device: no host synchronisation
        rows = (self.pointer + torch.arange(keys.shape[0], device=self.queue.device)) % self.size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.pointer.copy_((self.pointer + keys.shape[0]) % self.size)


class ProjectionHead(nn.Module):
    """MoCo v2 MLP head: Linear(in, hidden) -> ReLU -> Linear(hidden, out); (B, in) -> (B, out).

    ``batch_norm`` (the MoCo v3 / SimCLR v2 head): Linear -> BatchNorm1d -> ReLU -> Linear ->
    BatchNorm1d without affine parameters, which centres every output dimension over the batch.
    Without it the outputs share a large common component (post-ReLU features, a bias), so the
    L2-normalised embeddings of any two frames start at cosine 0.7-0.9 and, in a short run, stay
    there: measured on the demo's frames, MoCo from scratch stays at chance InfoNCE with it off
    (README, "Surgical pre-training: what stopped it learning").
    The output is not normalised; L2-normalise it before :func:`contrastive_logits`.
    """

    def __init__(
        self, in_dim: int = 2048, hidden_dim: int = 2048, out_dim: int = 128, batch_norm: bool = False
    ) -> None:
        super().__init__()
        if batch_norm:
            layers = [
                nn.Linear(in_dim, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, out_dim, bias=False),
                nn.BatchNorm1d(out_dim, affine=False),
            ]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    @property
    def out_dim(self) -> int:
        return next(m.out_features for m in reversed(self.layers) if isinstance(m, nn.Linear))

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


@torch.no_grad()
def update_momentum(model: nn.Module, ema_model: nn.Module, m: float) -> None:
    """In place, for every parameter pair: ``ema = m * ema + (1 - m) * param``.

    Buffers (batch-norm statistics) are not averaged: the momentum encoder keeps its own, as in
    MoCo. ``model`` and ``ema_model`` must have the same architecture.
    """
    ema_parameters = list(ema_model.parameters())
    parameters = list(model.parameters())
    if len(ema_parameters) != len(parameters):
        raise ValueError(f"update_momentum: {len(parameters)} parameters vs {len(ema_parameters)} in the EMA model")
    torch._foreach_lerp_(ema_parameters, parameters, 1.0 - m)


def cosine_momentum(step: int, total_steps: int, base: float = 0.99, final: float = 1.0) -> float:
    """Momentum rising from ``base`` (step 0) to ``final`` (``total_steps``) on a half cosine (BYOL)."""
    if total_steps < 1:
        raise ValueError(f"cosine_momentum: total_steps must be >= 1, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def batch_shuffle_ddp(images: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle-BN (MoCo): exchange samples across processes before the key encoder.

    Args:
        images: (B, ...) this process's batch (B equal on every rank).

    Returns:
        (B, ...) this process's share of a random permutation of the global batch, and the
        (P * B,) index that :func:`batch_unshuffle_ddp` needs. In a single process: ``images``
        unchanged and the identity index.
    """
    rank, world_size = _world()
    if world_size == 1:
        return images, torch.arange(images.shape[0], device=images.device)
    gathered = concat_all_gather(images)
    shuffle = torch.randperm(gathered.shape[0], device=images.device)
    dist.broadcast(shuffle, src=0)
    return gathered[shuffle.view(world_size, -1)[rank]], torch.argsort(shuffle)


@torch.no_grad()
def batch_unshuffle_ddp(outputs: Tensor, unshuffle: Tensor) -> Tensor:
    """Undo :func:`batch_shuffle_ddp` on the key encoder's (B, ...) outputs (identity in one process)."""
    rank, world_size = _world()
    if world_size == 1:
        return outputs[unshuffle]
    return concat_all_gather(outputs)[unshuffle.view(world_size, -1)[rank]]


class MoCoEncoder(nn.Module):
    """Backbone + projection head: (B, 3, H, W) -> (B, proj_dim) unit-norm embeddings.

    ``backbone(x)`` gives the (B, D) pooled backbone features (linear probe, downstream tasks).
    """

    def __init__(self, backbone: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def embed(self, features: Tensor) -> Tensor:
        """(B, D) backbone features -> (B, proj_dim) unit-norm projections."""
        return F.normalize(self.head(features), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.backbone(x))


def build_moco_encoder(
    backbone: str,
    backbone_source: str,
    proj_hidden_dim: int,
    proj_dim: int,
    weights: str | None = None,
    proj_batch_norm: bool = False,
) -> MoCoEncoder:
    """A MoCo encoder on a timm/torchvision backbone; ``weights``: None (random), "public" or a file."""
    net = build_backbone(backbone, weights=weights, source=backbone_source)
    return MoCoEncoder(net, ProjectionHead(feature_dim(net), proj_hidden_dim, proj_dim, proj_batch_norm))
