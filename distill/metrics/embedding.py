"""What a self-supervised embedding has learned, and how close a student's is to its teacher's.

All take L2-normalised embeddings (N, D) of the same N held-out frames (row i of the teacher's
and the student's is the same frame); similarities are cosines.

- :func:`info_nce_chance`: ln(1 + K), the InfoNCE of an encoder that tells nothing apart.
- :func:`knn_accuracy`: leave-one-group-out k-NN classification accuracy of the embeddings
  (e.g. phases, neighbours taken from *other* videos only, so temporal neighbours do not count).
- :func:`similarity_kl`: mean KL(teacher || student) between each frame's softmax distributions
  of similarity to the other frames (what MoCo distillation matches, on held-out frames).
- :func:`neighbour_overlap`: mean share of each frame's top-k teacher neighbours that are also
  its top-k student neighbours (chance: about k / (N - 1)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["info_nce_chance", "knn_accuracy", "neighbour_overlap", "similarity_kl"]


def info_nce_chance(queue_size: int) -> float:
    """ln(1 + K): InfoNCE when the positive is no more similar than each of the K negatives."""
    if queue_size < 1:
        raise ValueError(f"info_nce_chance: queue_size must be >= 1, got {queue_size}")
    return math.log(1 + queue_size)


def _check_embeddings(*embeddings: Tensor) -> int:
    """N of (N, D) embeddings (the same N for all; N >= 2)."""
    sizes = {e.shape[0] for e in embeddings}
    if any(e.ndim != 2 for e in embeddings) or len(sizes) != 1 or sizes.pop() < 2:
        raise ValueError(
            f"embedding metrics: need (N, D) embeddings of the same N >= 2, got {[tuple(e.shape) for e in embeddings]}"
        )
    return embeddings[0].shape[0]


#: Rows of the (N, N) similarity matrix held at once: peak memory is O(BLOCK_ROWS x N), never O(N^2)
#: (N = 43,000 test frames: 44 MB per float32 block instead of 7.4 GB per matrix).
BLOCK_ROWS = 256


def _similarity_blocks(embeddings: Tensor, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[slice, Tensor]]:
    """``(rows, similarity)`` for consecutive row blocks: (b, N) cosine similarities of frames ``rows``
    with every frame, each frame's similarity with itself at -inf. On the embeddings' device."""
    embeddings = embeddings.float()
    n = embeddings.shape[0]
    for start in range(0, n, block_rows):
        rows = slice(start, min(start + block_rows, n))
        similarity = embeddings[rows] @ embeddings.T
        index = torch.arange(rows.stop - start, device=embeddings.device)
        similarity[index, index + start] = float("-inf")
        yield rows, similarity


def knn_accuracy(embeddings: Tensor, labels: Tensor, groups: Tensor | None = None, k: int = 10) -> float:
    """Leave-one-group-out k-NN accuracy: each frame takes the majority label of its k most
    similar frames outside its own group (ties: the most similar neighbour's label wins).
    Computed in row blocks (:data:`BLOCK_ROWS`) on the embeddings' device.

    Args:
        embeddings: (N, D) L2-normalised.
        labels: (N,) int64 class of each frame.
        groups: (N,) int64 group (e.g. video) of each frame; None: only the frame itself is left out.
        k: neighbours (fewer when fewer frames are outside a group).

    Returns:
        Share of the frames (with at least one frame outside their group) classified correctly;
        NaN when no frame has one.
    """
    n = _check_embeddings(embeddings)
    if labels.shape != (n,) or (groups is not None and groups.shape != (n,)):
        raise ValueError(f"knn_accuracy: labels and groups must be ({n},), got {tuple(labels.shape)}")
    labels = labels.to(embeddings.device)
    classes = int(labels.max()) + 1
    correct = valid_frames = torch.zeros((), dtype=torch.float64, device=embeddings.device)
    for rows, similarity in _similarity_blocks(embeddings):
        if groups is not None:
            groups = groups.to(embeddings.device)
            similarity = similarity.masked_fill(groups[rows, None] == groups[None, :], float("-inf"))
        valid = torch.isfinite(similarity).any(1)
        top = similarity[valid].topk(min(k, n - 1), dim=1)
        neighbour_labels = labels[top.indices].masked_fill(~torch.isfinite(top.values), -1)  # (M, k)
        votes = torch.zeros(neighbour_labels.shape[0], classes + 1, dtype=torch.float64, device=embeddings.device)
        votes.scatter_add_(1, neighbour_labels + 1, torch.ones_like(neighbour_labels, dtype=torch.float64))
        votes[:, 0] = -1  # column 0 counts missing neighbours
        # ties: a tiny bonus for the most similar neighbour's class
        votes.scatter_add_(1, neighbour_labels[:, :1] + 1, torch.full_like(votes[:, :1], 0.5))
        correct = correct + ((votes.argmax(1) - 1) == labels[rows][valid]).sum()
        valid_frames = valid_frames + valid.sum()
    return float(correct / valid_frames) if valid_frames > 0 else float("nan")


def similarity_kl(teacher: Tensor, student: Tensor, temperature: float = 0.2) -> float:
    """Mean over frames i of KL(p_t(i) || p_s(i)), p(i) = softmax_j≠i(e_i . e_j / temperature).
    Computed in row blocks (:data:`BLOCK_ROWS`) on the embeddings' device.

    Args:
        teacher, student: (N, D) L2-normalised embeddings of the same N frames (any D each).
        temperature: the contrastive temperature tau (MoCo v2: 0.2).
    """
    n = _check_embeddings(teacher, student)
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    for (_, similarity_t), (_, similarity_s) in zip(_similarity_blocks(teacher), _similarity_blocks(student)):
        others = torch.isfinite(similarity_t)  # every frame but the row's own
        log_t = torch.log_softmax(similarity_t.div_(temperature), dim=1)
        log_s = torch.log_softmax(similarity_s.div_(temperature), dim=1)
        log_ratio = (log_t - log_s).masked_fill_(~others, 0.0)
        total = total + (log_t.exp_() * log_ratio).sum(dtype=torch.float64)
    return float(total / n)


def neighbour_overlap(teacher: Tensor, student: Tensor, k: int = 5) -> float:
    """Mean over frames of |top-k teacher neighbours ∩ top-k student neighbours| / k (self excluded).
    Computed in row blocks (:data:`BLOCK_ROWS`) on the embeddings' device.

    Identical neighbourhoods give 1; unrelated embeddings about k / (N - 1).
    """
    n = _check_embeddings(teacher, student)
    k = min(k, n - 1)
    shared = torch.zeros((), dtype=torch.float64, device=student.device)
    for (_, similarity_t), (_, similarity_s) in zip(_similarity_blocks(teacher), _similarity_blocks(student)):
        top_t = similarity_t.topk(k, dim=1).indices
        top_s = similarity_s.topk(k, dim=1).indices
        shared = shared + (top_t[:, :, None] == top_s[:, None, :]).any(2).sum().to(shared)
    return float(shared / (n * k))
