"""Output-layer prior initialisation: where training starts, and that every layer trains from step one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill.errors import DataError
from distill.models import build_segmentation_network, init_output_prior
from distill.modules import SegmentationModule


def head_of(net: nn.Module, num_classes: int) -> nn.Conv2d:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes][-1]


@pytest.mark.parametrize("network", ["slim_unet", "mobile_unet"])
def test_zero_output_weights_start_every_pixel_exactly_at_the_prior(network):
    kwargs = {"width": 4} if network == "slim_unet" else {}
    for seed in range(3):
        torch.manual_seed(seed)
        net = build_segmentation_network(network, 3, 3, **kwargs)
        init_output_prior(net, 3, 0.02, weight_std=0.0)
        probs = net.train()(torch.randn(2, 3, 32, 32)).softmax(1)
        # softmax of the bias (log 0.98, log 0.01, log 0.01) is (0.98, 0.01, 0.01) at every pixel
        expected = torch.tensor([0.98, 0.01, 0.01]).view(1, 3, 1, 1).expand_as(probs)
        assert torch.allclose(probs, expected, atol=1e-6)
    with pytest.raises(DataError, match="foreground_prior must be in \\(0, 1\\)"):
        init_output_prior(net, 3, 1.5)
    with pytest.raises(DataError, match="foreground_prior_weight_std must be >= 0"):
        init_output_prior(net, 3, 0.02, weight_std=-0.1)


def test_default_keeps_the_network_weights_and_starts_near_the_prior_on_every_seed():
    """The default sets the bias only: the mean foreground probability stays within 2x of the 1 %
    prior on every seed, where the random output layer starts anywhere (one of these seeds above 50 %)."""
    image = torch.randn(4, 3, 32, 32)
    prior_means, random_means = [], []
    for seed in range(5):
        torch.manual_seed(seed)
        module = SegmentationModule(network="slim_unet", network_kwargs={"width": 4})
        torch.manual_seed(seed)
        random = SegmentationModule(network="slim_unet", network_kwargs={"width": 4}, foreground_prior=None)
        head, random_head = head_of(module.net, 2), head_of(random.net, 2)
        assert torch.equal(head.weight, random_head.weight)  # the network's own initialisation
        assert head.bias.tolist() == pytest.approx([math.log(0.99), math.log(0.01)])
        with torch.no_grad():
            prior_means.append(module.train()(image).softmax(1)[:, 1].mean().item())
            random_means.append(random.train()(image).softmax(1)[:, 1].mean().item())
    assert all(0.005 < p < 0.02 for p in prior_means), prior_means
    assert max(random_means) > 0.5, random_means


def first_step_gradients(**init) -> dict[str, float]:
    """Gradient norm of every parameter tensor of a width-4 U-Net after one Dice + Lovasz step on
    a batch with a 4 % foreground square (the head's ``final_conv`` included)."""
    torch.manual_seed(0)
    module = SegmentationModule(network="slim_unet", network_kwargs={"width": 4}, **init).train()
    label = torch.zeros(4, 32, 32, dtype=torch.long)
    label[:, 12:18, 12:18] = 1
    image = torch.randn(4, 3, 32, 32) + 2.0 * label[:, None].float()
    batch = {"image": image, "label": label}
    sum(module.loss_terms(batch, module.training_outputs(batch)).values()).backward()
    return {name: p.grad.norm().item() for name, p in module.net.named_parameters()}


@pytest.mark.parametrize(
    "init",
    [{}, {"foreground_prior_weight_std": 0.01}],
    ids=["default", "retinanet"],
)
def test_every_earlier_layer_gets_a_gradient_at_the_first_step(init):
    earlier = {name: g for name, g in first_step_gradients(**init).items() if not name.startswith("final_conv")}
    assert len(earlier) > 20
    assert min(earlier.values()) > 0, [name for name, g in earlier.items() if g == 0]


def test_zero_output_weights_leave_every_earlier_layer_without_gradient():
    """The old default's flaw: d loss / d features = W^T d loss / d logits = 0 below a zero head."""
    gradients = first_step_gradients(foreground_prior_weight_std=0.0)
    assert gradients["final_conv.weight"] > 0
    assert max(g for name, g in gradients.items() if not name.startswith("final_conv")) == 0
