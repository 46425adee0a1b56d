"""Batch norm folded into convolutions: the same outputs, module paths kept, refused when unsafe."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from distill.models import FeatureTaps, build_segmentation_network, fold_batch_norms


def with_trained_statistics(net: nn.Module) -> nn.Module:
    """Batch-norm statistics and affine parameters away from the identity, as training leaves them."""
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, low, high in (
                (module.running_mean, -1, 1),
                (module.running_var, 0.3, 3),
                (module.weight.data, 0.5, 1.5),
                (module.bias.data, -0.5, 0.5),
            ):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return net.eval()


def test_unet_folds_every_batch_norm_and_keeps_outputs_and_tapped_features():
    torch.manual_seed(0)
    net = with_trained_statistics(build_segmentation_network("slim_unet", 3, 2, width=4))
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    folded, convs = fold_batch_norms(net, torch.randn(1, 3, 32, 32))
    assert len(convs) == norms == 18 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is untouched
    x = torch.randn(4, 3, 48, 48)
    paths = ["down_2", "conv_0.conv_0.adn.N"]  # a block's output and a folded batch norm's path
    taps, folded_taps = FeatureTaps(net, paths), FeatureTaps(folded, paths)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)
    for a, b in zip(folded_taps.pop(), taps.pop()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class ConvUsedTwice(nn.Module):
    """``bn(conv(x)) + conv(x)``: the convolution's raw output is used beside the batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_folding_is_refused_when_outputs_would_change_and_for_kept_convolutions(caplog):
    net = with_trained_statistics(ConvUsedTwice())
    assert fold_batch_norms(net, torch.randn(1, 3, 8, 8)) == (net, [])
    assert "outputs differ" in caplog.text
    block = with_trained_statistics(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    )
    folded, convs = fold_batch_norms(block, torch.randn(1, 3, 8, 8), keep=("0",))
    assert convs == ["2"] and isinstance(folded[1], nn.BatchNorm2d) and isinstance(folded[3], nn.Identity)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(block.train(), torch.randn(1, 3, 8, 8))


def test_timm_batchnorm_act_keeps_its_activation():
    net = with_trained_statistics(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0))
    folded, convs = fold_batch_norms(net, torch.randn(1, 3, 64, 64))
    assert len(convs) == sum(isinstance(m, BatchNormAct2d) for m in net.modules()) > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)


def test_folding_under_mixed_precision_checks_at_full_precision():
    net = with_trained_statistics(build_segmentation_network("slim_unet", 3, 2, width=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        folded, convs = fold_batch_norms(net, torch.randn(1, 3, 32, 32))
    assert len(convs) == 18


def test_the_folding_check_runs_without_tf32_and_restores_the_runs_settings(monkeypatch):
    """A GPU run may allow TF32 (float32_matmul_precision: high; cuDNN's default for convolutions),
    whose rounding alone would fail the check and silently lose the folding: the check turns it off."""
    seen = []
    check = torch.testing.assert_close

    def recording(*args, **kwargs):
        seen.append((torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))
        return check(*args, **kwargs)

    monkeypatch.setattr(torch.testing, "assert_close", recording)
    net = with_trained_statistics(build_segmentation_network("slim_unet", 3, 2, width=4))
    before = torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32, _ = True, torch.set_float32_matmul_precision("medium")
    try:
        _, convs = fold_batch_norms(net, torch.randn(1, 3, 32, 32))
        assert seen == [(False, "highest")] and len(convs) == 18
        assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == (True, "medium")
    finally:
        torch.set_float32_matmul_precision(before)
