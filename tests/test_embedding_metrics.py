"""What a self-supervised embedding learned (distill.metrics.embedding), against hand-computed values."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from distill.metrics.embedding import info_nce_chance, knn_accuracy, neighbour_overlap, similarity_kl

# four unit vectors in 2-D; cosines: e0.e1 = 0.8, e0.e2 = 0, e0.e3 = -0.6, e1.e2 = 0.6, e1.e3 = 0, e2.e3 = 0.8
E = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])


def test_info_nce_chance_is_log_one_plus_k():
    assert info_nce_chance(256) == pytest.approx(math.log(257)) == pytest.approx(5.5491, abs=1e-4)
    with pytest.raises(ValueError):
        info_nce_chance(0)


def test_knn_accuracy_leaves_out_the_frame_and_its_group():
    labels = torch.tensor([0, 0, 1, 0])
    # k = 1, only the frame left out: e0->e1 (0) right, e1->e0 (0) right, e2->e3 (0) wrong, e3->e2 (1) wrong
    assert knn_accuracy(E, labels, k=1) == 0.5
    # groups (videos) {e0, e1} and {e2, e3}: e0->e2 wrong, e1->e2 wrong, e2->e1 wrong, e3->e1 right
    assert knn_accuracy(E, labels, torch.tensor([0, 0, 1, 1]), k=1) == 0.25
    # k = 3: the other three frames vote; labels (0, 0, 1, 0) -> 0 for every frame: only e2 is wrong
    assert knn_accuracy(E, labels, k=3) == 0.75
    # ties (k = 2) go to the nearest neighbour's label: labels (1, 0, 1, 1):
    # e0: e1 (0) vs e2 (1) -> 0 wrong; e1: e0, e2 (1, 1) -> 1 wrong; e2: e3 (1) vs e1 (0) -> 1 right;
    # e3: e2 (1) vs e1 (0) -> 1 right
    assert knn_accuracy(E, torch.tensor([1, 0, 1, 1]), k=2) == 0.5


def test_knn_accuracy_without_frames_outside_any_group_is_nan():
    assert math.isnan(knn_accuracy(E, torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long)))


def test_similarity_kl_by_hand():
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    student = torch.eye(3)  # all similarities 0: uniform over the other two frames
    # frames 0 and 1: teacher similarities (1, 0) -> p = (e, 1) / (e + 1); frame 2: (0, 0) -> uniform
    p = math.e / (math.e + 1)
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert similarity_kl(teacher, student, temperature=1.0) == pytest.approx(2 * kl / 3, abs=1e-6)
    assert similarity_kl(teacher, student, temperature=0.5) > similarity_kl(teacher, student, temperature=1.0)
    assert similarity_kl(E, E) == pytest.approx(0.0, abs=1e-7)


def test_neighbour_overlap_by_hand():
    student = E[[0, 2, 1, 3]]  # frames 1 and 2 swapped
    assert neighbour_overlap(E, E, k=2) == 1.0
    # k = 1: teacher's nearest 0->1, 1->0, 2->3, 3->2; student's 0->2, 1->3, 2->0, 3->1: none shared
    assert neighbour_overlap(E, student, k=1) == 0.0
    # k = 2: teacher {1, 2}, {0, 2}, {3, 1}, {2, 1}; student {2, 1}, {3, 2}, {0, 1}, {1, 2} -> 1, 1/2, 1/2, 1
    assert neighbour_overlap(E, student, k=2) == 0.75


def test_embeddings_of_different_frames_are_refused():
    with pytest.raises(ValueError, match="same N"):
        neighbour_overlap(E, E[:3])
    with pytest.raises(ValueError, match="labels"):
        knn_accuracy(E, torch.tensor([0, 1]))


def _dense_reference(teacher, student, labels, groups, k_nn, k_overlap, temperature):
    """The metrics from full (N, N) matrices, as written before they were computed in blocks."""
    n = teacher.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    sim_t, sim_s = (e @ e.T for e in (teacher, student))
    knn_sim = sim_s.masked_fill(eye | (groups[:, None] == groups[None, :]), float("-inf"))
    valid = torch.isfinite(knn_sim).any(1)
    top = knn_sim[valid].topk(k_nn, dim=1)
    votes = torch.zeros(int(valid.sum()), int(labels.max()) + 2, dtype=torch.float64)
    neighbour = labels[top.indices].masked_fill(~torch.isfinite(top.values), -1) + 1
    votes.scatter_add_(1, neighbour, torch.ones_like(neighbour, dtype=torch.float64))
    votes[:, 0] = -1
    votes.scatter_add_(1, neighbour[:, :1], torch.full((votes.shape[0], 1), 0.5, dtype=torch.float64))
    knn = float(((votes.argmax(1) - 1) == labels[valid]).double().mean())
    log_t = torch.log_softmax(sim_t[~eye].view(n, n - 1) / temperature, 1)
    log_s = torch.log_softmax(sim_s[~eye].view(n, n - 1) / temperature, 1)
    kl = float((log_t.exp() * (log_t - log_s)).sum(1).mean())
    top_t = sim_t.masked_fill(eye, float("-inf")).topk(k_overlap, 1).indices
    top_s = sim_s.masked_fill(eye, float("-inf")).topk(k_overlap, 1).indices
    overlap = float((top_t[:, :, None] == top_s[:, None, :]).any(2).double().mean(1).mean())
    return knn, kl, overlap


def test_blocked_metrics_equal_the_dense_computation(monkeypatch):
    """Over several row blocks (and a last, shorter one) the results are those of the full matrices."""
    from distill.metrics import embedding

    monkeypatch.setattr(embedding, "BLOCK_ROWS", 64)
    generator = torch.Generator().manual_seed(0)
    teacher = torch.nn.functional.normalize(torch.randn(300, 16, generator=generator), dim=1)
    student = torch.nn.functional.normalize(teacher + 0.7 * torch.randn(300, 16, generator=generator), dim=1)
    labels, groups = torch.randint(0, 4, (300,), generator=generator), torch.randint(0, 5, (300,), generator=generator)
    knn, kl, overlap = _dense_reference(teacher, student, labels, groups, 10, 5, 0.2)
    assert knn_accuracy(student, labels, groups, k=10) == pytest.approx(knn, abs=1e-12)
    assert similarity_kl(teacher, student, 0.2) == pytest.approx(kl, rel=1e-5)
    assert neighbour_overlap(teacher, student, k=5) == pytest.approx(overlap, abs=1e-12)


def test_metrics_of_many_frames_stay_in_bounded_memory():
    """10,000 frames: one dense (N, N) float32 matrix is 400 MB and the dense code held several (over
    1.2 GB); in row blocks the peak is O(N x BLOCK_ROWS), measured 107-161 MB above the inputs at 12,000.
    A child process, so the peak RSS is this computation's own."""
    script = """
import resource, torch
from distill.metrics.embedding import knn_accuracy, neighbour_overlap, similarity_kl
g = torch.Generator().manual_seed(0)
n = 10_000
t = torch.nn.functional.normalize(torch.randn(n, 128, generator=g), dim=1)
s = torch.nn.functional.normalize(torch.randn(n, 128, generator=g), dim=1)
labels, groups = torch.randint(0, 7, (n,), generator=g), torch.randint(0, 40, (n,), generator=g)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
knn_accuracy(s, labels, groups), similarity_kl(t, s), neighbour_overlap(t, s)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert float(done.stdout.strip().splitlines()[-1]) < 300  # MB above the inputs
