"""MoCo pieces (``distill.models.ssl``) and contrastive losses (``distill.losses.contrastive``)."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from distill.losses import contrastive_logits, info_nce_loss, similarity_distillation_loss, soft_kl_divergence
from distill.models import (
    MemoryQueue,
    ProjectionHead,
    batch_shuffle_ddp,
    batch_unshuffle_ddp,
    cosine_momentum,
    update_momentum,
)

# --- losses ----------------------------------------------------------------------------------------


def test_contrastive_logits_by_hand():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    key = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # row 0: q.k = 0.6, q.queue = (0, -1); row 1: q.k = 1, q.queue = (1, 0); all / 0.5
    expected = torch.tensor([[1.2, 0.0, -2.0], [2.0, 2.0, 0.0]])
    torch.testing.assert_close(contrastive_logits(query, key, queue, temperature=0.5), expected)
    with pytest.raises(ValueError, match=r"queue \(2, 3\) \(K, D\)"):
        contrastive_logits(query, key, torch.zeros(2, 3), 0.5)


def test_info_nce_by_hand():
    # row 0: uniform over 3 -> ln 3; row 1: softmax(ln 2, 0, 0)[0] = 1/2 -> ln 2
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    assert info_nce_loss(logits).item() == pytest.approx(math.log(6.0) / 2, abs=1e-6)


def test_similarity_distillation_by_hand():
    # row 0: teacher (1/4, 1/2, 1/4), student uniform: KL = 1/2 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8)
    # row 1: equal distributions -> 0; batch mean over 2 rows
    teacher = torch.tensor([[0.0, math.log(2.0), 0.0], [1.0, 2.0, 3.0]])
    student = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    loss = similarity_distillation_loss(student, teacher)
    assert loss.item() == pytest.approx(math.log(9 / 8) / 4, abs=1e-6)
    assert similarity_distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    torch.manual_seed(0)
    random_student = torch.randn(4, 9)
    assert similarity_distillation_loss(random_student, torch.randn(4, 9)).item() > 0
    # the same soft KL as the pixel KD: T^2-scaled at another temperature
    assert similarity_distillation_loss(student, teacher, temperature=2.0).item() == pytest.approx(
        soft_kl_divergence(student, teacher, 2.0, dim=1).item()
    )
    assert similarity_distillation_loss(2 * student, 2 * teacher, temperature=2.0).item() == pytest.approx(
        4 * loss.item(), rel=1e-6
    )


def test_reference_total_loss_is_a_weighting_of_the_pieces():
    torch.manual_seed(0)
    query, key, queue = (nn.functional.normalize(torch.randn(n, 8), dim=1) for n in (4, 4, 16))
    student = contrastive_logits(query, key, queue, 0.2)
    teacher = contrastive_logits(key, query, queue, 0.2)
    assert student.shape == (4, 17)
    paper = info_nce_loss(student) + 5 * similarity_distillation_loss(student, teacher)
    reference_code = 2 * info_nce_loss(student) + 5 * similarity_distillation_loss(student, teacher)
    assert reference_code.item() == pytest.approx(paper.item() + info_nce_loss(student).item(), rel=1e-6)


# --- queue -----------------------------------------------------------------------------------------


def test_queue_enqueue_order_wraps_around():
    queue = MemoryQueue(dim=2, size=4)
    assert queue.queue.norm(dim=1).tolist() == pytest.approx([1.0] * 4)
    first, second, third = torch.eye(2), -torch.eye(2), torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    queue.enqueue(first)
    assert int(queue.pointer) == 2
    queue.enqueue(second)
    assert int(queue.pointer) == 0
    torch.testing.assert_close(queue(), torch.cat([first, second]))
    queue.enqueue(third)  # overwrites the oldest keys
    assert int(queue.pointer) == 2
    torch.testing.assert_close(queue(), torch.cat([third, second]))
    restored = MemoryQueue(dim=2, size=4)
    restored.load_state_dict(queue.state_dict())
    assert int(restored.pointer) == 2
    torch.testing.assert_close(restored(), queue())


def test_queue_contents_can_be_used_in_a_loss_before_enqueue():
    queue = MemoryQueue(dim=3, size=4)
    query = nn.functional.normalize(torch.randn(2, 3), dim=1).requires_grad_()
    key = nn.functional.normalize(torch.randn(2, 3), dim=1)
    loss = info_nce_loss(contrastive_logits(query, key, queue(), 0.2))
    queue.enqueue(key)
    loss.backward()  # would fail had the loss kept the buffer that enqueue overwrote in place
    assert query.grad is not None


def test_keys_past_the_end_of_the_queue_wrap_around():
    # a batch that does not divide the queue (modules refuse that when fitting starts) still writes in bounds
    queue = MemoryQueue(dim=2, size=5)
    for step in range(3):
        queue.enqueue(torch.full((2, 2), float(step + 1)))
    assert queue()[:, 0].tolist() == [3.0, 1.0, 2.0, 2.0, 3.0] and int(queue.pointer) == 1  # rows 4, 0 last


# --- momentum, head, shuffle -----------------------------------------------------------------------


def test_update_momentum_numbers():
    model, ema = nn.Linear(1, 1), nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(-2.0)
        ema.weight.fill_(0.0), ema.bias.fill_(0.0)
    update_momentum(model, ema, m=0.9)
    assert (ema.weight.item(), ema.bias.item()) == pytest.approx((0.1, -0.2))
    update_momentum(model, ema, m=0.9)
    assert (ema.weight.item(), ema.bias.item()) == pytest.approx((0.19, -0.38))
    assert (model.weight.item(), model.bias.item()) == (1.0, -2.0)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100) == pytest.approx(0.99)
    assert cosine_momentum(50, 100) == pytest.approx(0.995)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(150, 100, base=0.996, final=1.0) == pytest.approx(1.0)


def test_projection_head_shapes():
    head = ProjectionHead(in_dim=16, hidden_dim=32, out_dim=8)
    assert head(torch.randn(3, 16)).shape == (3, 8)
    assert [p.shape for p in ProjectionHead().parameters()] == [(2048, 2048), (2048,), (128, 2048), (128,)]


def test_batch_norm_head_centres_the_embeddings_that_a_plain_head_leaves_in_a_cone():
    torch.manual_seed(0)
    features = torch.rand(64, 16) + 1.0  # post-ReLU-like: positive, a large common component
    plain, normed = ProjectionHead(16, 32, 8), ProjectionHead(16, 32, 8, batch_norm=True)
    assert normed.out_dim == plain.out_dim == 8
    outputs = normed(features)  # training mode: batch statistics
    torch.testing.assert_close(outputs.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs.var(0, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)

    def mean_cosine(x: torch.Tensor) -> float:
        x = torch.nn.functional.normalize(x, dim=1)
        return float((x @ x.T)[~torch.eye(len(x), dtype=torch.bool)].mean())

    assert mean_cosine(plain(features)) > 0.8 and abs(mean_cosine(outputs)) < 0.1


def test_shuffle_unshuffle_single_process_is_identity():
    images = torch.randn(4, 3, 2, 2)
    shuffled, unshuffle = batch_shuffle_ddp(images)
    torch.testing.assert_close(shuffled, images)
    torch.testing.assert_close(batch_unshuffle_ddp(shuffled * 2, unshuffle), images * 2)


def _two_rank_worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * (rank + 1)  # rank 0: e1, e2; rank 1: 2 e1, 2 e2
        queue = MemoryQueue(dim=2, size=8)
        queue.enqueue(keys)
        gathered = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
        torch.testing.assert_close(queue()[:4], gathered)  # the same on both ranks
        assert int(queue.pointer) == 4

        torch.manual_seed(rank)  # the permutation must come from rank 0 alone
        images = torch.arange(3.0).view(3, 1) + 10 * rank  # global batch 0, 1, 2, 10, 11, 12
        shuffled, unshuffle = batch_shuffle_ddp(images)
        everyone = [torch.empty_like(shuffled) for _ in range(2)]
        dist.all_gather(everyone, shuffled)
        assert sorted(torch.cat(everyone).flatten().tolist()) == [0, 1, 2, 10, 11, 12]
        torch.testing.assert_close(batch_unshuffle_ddp(shuffled, unshuffle), images)
    finally:
        dist.destroy_process_group()


def test_queue_and_shuffle_across_two_processes(tmp_path):
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"),), nprocs=2)
