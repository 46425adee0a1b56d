"""What a self-supervised embedding learned (distill.metrics.embedding), against hand-computed values."""

from __future__ import annotations

import math

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
