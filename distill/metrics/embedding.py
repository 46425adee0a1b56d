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

import torch
from torch import Tensor

from distill.losses.kd import soft_kl_divergence

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


def _other_frames_similarity(embeddings: Tensor) -> Tensor:
    """(N, N) cosine similarities with the diagonal (a frame with itself) at -inf."""
    similarity = embeddings.float() @ embeddings.float().T
    return similarity.fill_diagonal_(float("-inf"))


def knn_accuracy(embeddings: Tensor, labels: Tensor, groups: Tensor | None = None, k: int = 10) -> float:
    """Leave-one-group-out k-NN accuracy: each frame takes the majority label of its k most
    similar frames outside its own group (ties: the most similar neighbour's label wins).

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
    similarity = _other_frames_similarity(embeddings)
    if groups is not None:
        similarity = similarity.masked_fill(groups[:, None] == groups[None, :], float("-inf"))
    valid = torch.isfinite(similarity).any(1)
    if not valid.any():
        return float("nan")
    top = similarity[valid].topk(min(k, n - 1), dim=1)
    neighbour_labels = labels[top.indices].masked_fill(~torch.isfinite(top.values), -1)  # (M, k)
    classes = int(labels.max()) + 1
    votes = torch.zeros(neighbour_labels.shape[0], classes + 1, dtype=torch.float64)
    votes.scatter_add_(1, neighbour_labels + 1, torch.ones_like(neighbour_labels, dtype=torch.float64))
    votes[:, 0] = -1  # column 0 counts missing neighbours
    # ties: a tiny bonus for the most similar neighbour's class
    votes.scatter_add_(1, neighbour_labels[:, :1] + 1, torch.full((votes.shape[0], 1), 0.5, dtype=torch.float64))
    predicted = votes.argmax(1) - 1
    return float((predicted == labels[valid]).double().mean())


def similarity_kl(teacher: Tensor, student: Tensor, temperature: float = 0.2) -> float:
    """Mean over frames i of KL(p_t(i) || p_s(i)), p(i) = softmax_j≠i(e_i . e_j / temperature).

    Args:
        teacher, student: (N, D) L2-normalised embeddings of the same N frames (any D each).
        temperature: the contrastive temperature tau (MoCo v2: 0.2).
    """
    n = _check_embeddings(teacher, student)
    mask = ~torch.eye(n, dtype=torch.bool)
    logits_t = (teacher.float() @ teacher.float().T)[mask].view(n, n - 1) / temperature
    logits_s = (student.float() @ student.float().T)[mask].view(n, n - 1) / temperature
    return float(soft_kl_divergence(logits_s, logits_t, 1.0, dim=1))


def neighbour_overlap(teacher: Tensor, student: Tensor, k: int = 5) -> float:
    """Mean over frames of |top-k teacher neighbours ∩ top-k student neighbours| / k (self excluded).

    Identical neighbourhoods give 1; unrelated embeddings about k / (N - 1).
    """
    n = _check_embeddings(teacher, student)
    k = min(k, n - 1)
    top_t = _other_frames_similarity(teacher).topk(k, dim=1).indices
    top_s = _other_frames_similarity(student).topk(k, dim=1).indices
    shared = (top_t[:, :, None] == top_s[:, None, :]).any(2).sum(1)
    return float(shared.double().mean() / k)
