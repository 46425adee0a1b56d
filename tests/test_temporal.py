"""Temporal phase models (``distill.models.temporal``) and their losses (``distill.losses.temporal``)."""

import math

import pytest
import torch

from distill.losses import phase_segmentation_loss, truncated_mse_smoothing
from distill.models import MultiStageTCN, SingleStageTCN, TCNShape

LN2, LN3 = math.log(2.0), math.log(3.0)


def changed_frames(model, frame: int, frames: int = 24) -> list[int]:
    """Frames whose output changes when only input ``frame`` changes (eval mode)."""
    torch.manual_seed(0)
    features = torch.randn(2, 5, frames)
    edited = features.clone()
    edited[:, :, frame] += 1.0
    with torch.no_grad():
        difference = (model.eval()(features) - model(edited)).abs()
    frame_axis = difference.ndim - 1
    return torch.nonzero(difference.amax(dim=tuple(range(frame_axis))) > 1e-6).flatten().tolist()


def test_causal_tcn_sees_only_the_past_within_its_receptive_field():
    torch.manual_seed(0)
    model = SingleStageTCN(in_dim=5, num_classes=3, shape=TCNShape(num_layers=3, channels=8))
    # receptive field 2^(3+1) - 1 = 15 frames: input 4 reaches outputs 4 .. 18, never earlier ones
    assert changed_frames(model, frame=4) == list(range(4, 19))
    assert model.eval()(torch.randn(2, 5, 24)).shape == (2, 3, 24)


def test_acausal_tcn_sees_both_sides():
    torch.manual_seed(0)
    model = SingleStageTCN(in_dim=5, num_classes=3, shape=TCNShape(num_layers=3, channels=8, causal=False))
    assert changed_frames(model, frame=12) == list(range(5, 20))  # 12 +- 7


def test_multi_stage_tcn_shapes_and_causality():
    torch.manual_seed(0)
    model = MultiStageTCN(in_dim=5, num_classes=3, shape=TCNShape(num_stages=3, num_layers=2, channels=8))
    assert model.eval()(torch.randn(2, 5, 24)).shape == (3, 2, 3, 24)
    assert min(changed_frames(model, frame=10)) == 10
    reference = TCNShape().build(in_dim=5, num_classes=7)  # the reference: one causal stage, 12 layers, 64 maps
    assert isinstance(reference, SingleStageTCN)
    assert len(reference.layers) == 12 and reference.conv_in.out_channels == 64
    assert isinstance(TCNShape(num_stages=2).build(5, 7), MultiStageTCN)
    assert TCNShape().describe() == "causal single-stage TCN, 12 layers"
    assert TCNShape(num_stages=4, causal=False).describe() == "offline (sees future frames) MS-TCN, 4 stages"
    with pytest.raises(ValueError, match="num_stages must be >= 1, got 0"):
        TCNShape(num_stages=0)


def test_truncated_mse_smoothing_by_hand():
    # frame 0: p = (1/2, 1/2); frame 1: p = (3/4, 1/4); frame 2 = frame 1
    logits = torch.tensor([[[0.0, LN3, LN3], [0.0, 0.0, 0.0]]], requires_grad=True)
    expected = (math.log(1.5) ** 2 + LN2**2) / 4  # mean over 2 classes x 2 frame pairs
    loss = truncated_mse_smoothing(logits)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert logits.grad[..., 0].abs().max() == 0  # the previous frame is the (detached) target
    assert logits.grad[..., 1].abs().max() > 0
    valid = torch.tensor([[True, True, False]])
    assert truncated_mse_smoothing(logits, valid=valid).item() == pytest.approx(expected * 2, abs=1e-6)


def test_truncated_mse_smoothing_clamps_large_jumps():
    logits = torch.tensor([[[0.0, 20.0], [0.0, 0.0]]])
    first = -math.log1p(math.exp(-20.0)) + LN2  # class 0: log(~1) - log(1/2)
    assert truncated_mse_smoothing(logits).item() == pytest.approx((first**2 + 16.0) / 2, abs=1e-5)
    assert truncated_mse_smoothing(logits, clamp=1.0).item() == pytest.approx((first**2 + 1.0) / 2, abs=1e-5)


def test_phase_segmentation_loss_by_hand():
    stage_a = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])  # frame probabilities (1/2, 1/2), (3/4, 1/4)
    stage_b = torch.zeros(1, 2, 2)
    stages = torch.stack([stage_a, stage_b])  # (S=2, B=1, C=2, T=2)
    smoothing_a = (math.log(1.5) ** 2 + LN2**2) / 2
    target = torch.tensor([[0, 0]])
    expected = (LN2 + math.log(4 / 3)) / 2 + 0.15 * smoothing_a + LN2
    assert phase_segmentation_loss(stages, target).item() == pytest.approx(expected, abs=1e-6)
    # ignored frame 1: cross-entropy on frame 0 only, no valid frame pair left to smooth
    assert phase_segmentation_loss(stages, torch.tensor([[0, -1]])).item() == pytest.approx(2 * LN2, abs=1e-6)
    # class weights: stage a frame 1 (class 1, p = 1/4) weighs 3, frame 0 (class 0, p = 1/2) weighs 1
    weighted = phase_segmentation_loss(
        stage_a, torch.tensor([[0, 1]]), smoothing_weight=1.0, class_weights=torch.tensor([1.0, 3.0])
    )
    assert weighted.item() == pytest.approx((LN2 + 3 * math.log(4)) / 4 + smoothing_a, abs=1e-6)
    with pytest.raises(ValueError, match=r"target \(1, 3\) must be \(B, T\) = \(1, 2\)"):
        phase_segmentation_loss(stages, torch.zeros(1, 3, dtype=torch.long))
