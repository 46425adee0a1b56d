"""Golden-value tests of the segmentation and distillation losses in ``distill.losses``."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.errors import DataError
from distill.losses import (
    FEATURE_LOSSES,
    LOGIT_LOSSES,
    AttentionTransferLoss,
    ChannelWiseFeatureLoss,
    ChannelWiseKDLoss,
    DiceLoss,
    FeatureMSELoss,
    KDLoss,
    LovaszLoss,
    RegionAffinityLoss,
    attention_map,
    attention_transfer_loss,
    channel_wise_divergence,
    check_loss_weights,
    choose_loss,
    lovasz_grad,
    lovasz_hinge,
    lovasz_softmax,
    pixel_kl_divergence,
    region_affinity_loss,
    soft_kl_divergence,
    soft_target_kl,
    weighted_sum,
)
from distill.losses.registry import build_feature_loss, logit_loss

LN3 = math.log(3.0)


# --- plain-Python reference of the Lovasz extension (no lovasz_grad) --------------------------


def jaccard_loss_of_mispredicted(ground_truth: list[bool], mispredicted: set[int]) -> float:
    """Delta(A) = 1 - |G \\ A| / |G u A|: the Jaccard loss when the pixels in A are wrong."""
    foreground = {i for i, g in enumerate(ground_truth) if g}
    union = foreground | mispredicted
    return 0.0 if not union else 1.0 - len(foreground - mispredicted) / len(union)


def brute_force_lovasz(errors: list[float], ground_truth: list[bool]) -> float:
    """sum_i m_pi(i) * (Delta(A_i) - Delta(A_{i-1})), pi sorting the errors decreasingly."""
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    total, previous, mispredicted = 0.0, 0.0, set()
    for i in order:
        mispredicted.add(i)
        current = jaccard_loss_of_mispredicted(ground_truth, mispredicted)
        total += errors[i] * (current - previous)
        previous = current
    return total


def brute_force_hinge(logits: list[float], labels: list[int]) -> float:
    errors = [max(0.0, 1.0 - x * (1.0 if y == 1 else -1.0)) for x, y in zip(logits, labels)]
    return brute_force_lovasz(errors, [y == 1 for y in labels])


def brute_force_softmax(probs: list[list[float]], labels: list[int], classes: list[int]) -> float:
    """probs[pixel][class]; mean over ``classes`` of the per-class Lovasz extension."""
    losses = []
    for c in classes:
        ground_truth = [y == c for y in labels]
        errors = [abs(float(g) - p[c]) for g, p in zip(ground_truth, probs)]
        losses.append(brute_force_lovasz(errors, ground_truth))
    return sum(losses) / len(losses)


def pixels_of(probs: torch.Tensor, b: int) -> list[list[float]]:
    """(B, C, H, W) -> image b as a list of per-pixel class-probability lists."""
    return probs[b].flatten(1).T.tolist()


# --- Dice ----------------------------------------------------------------------------------------


def three_pixel_case():
    """Foreground probabilities 3/4, 1/2, 1/4 against labels 1, 1, 0 (one image, 1x3)."""
    fg_logit = torch.tensor([LN3, 0.0, -LN3])
    logits = torch.stack([torch.zeros(3), fg_logit]).reshape(1, 2, 1, 3)
    return logits, torch.tensor([[[1, 1, 0]]])


def test_dice_three_pixels_by_hand():
    logits, target = three_pixel_case()
    # foreground: 2 * (3/4 + 1/2) / (3/2 + 2) = 5/7; background: 2 * 3/4 / (3/2 + 1) = 3/5
    foreground_only = DiceLoss(include_background=False, smooth_nr=0.0, smooth_dr=0.0)
    with_background = DiceLoss(include_background=True, smooth_nr=0.0, smooth_dr=0.0)
    assert foreground_only(logits, target).item() == pytest.approx(2 / 7, abs=1e-6)
    assert with_background(logits, target).item() == pytest.approx((2 / 7 + 2 / 5) / 2, abs=1e-6)


def test_dice_matches_definition_multiclass():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.arange(16).reshape(1, 4, 4).repeat(2, 1, 1) % 3
    target[1] = target[1].flip(-1)
    probs = logits.softmax(1)
    onehot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    dice = 2 * (probs * onehot).sum((2, 3)) / (probs.sum((2, 3)) + onehot.sum((2, 3)))  # (B, C)
    loss = DiceLoss(include_background=False, smooth_nr=0.0, smooth_dr=0.0)(logits, target)
    assert loss.item() == pytest.approx((1 - dice[:, 1:]).mean().item(), abs=1e-6)


@pytest.mark.parametrize("include_background", [False, True])
def test_dice_confident_perfect_prediction_is_zero(include_background):
    target = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [1, 0]]])
    logits = 30.0 * F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    assert DiceLoss(include_background)(logits, target).item() < 1e-6


def test_dice_rejects_mismatched_target():
    with pytest.raises(ValueError, match="DiceLoss: logits of shape"):
        DiceLoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))


# --- Lovasz --------------------------------------------------------------------------------------


def test_lovasz_grad_by_hand():
    # Delta after 1, 2, 3 pixels of gt [1, 0, 1]: 1 - 1/2, 1 - 1/3, 1 - 0/3
    grad = lovasz_grad(torch.tensor([1, 0, 1]))
    assert torch.allclose(grad, torch.tensor([1 / 2, 2 / 3 - 1 / 2, 1 - 2 / 3]))


def test_lovasz_hinge_hard_errors_equal_jaccard_loss():
    labels = torch.tensor([[[1, 1, 0, 0, 1, 0]]])
    signs = 2.0 * labels - 1.0
    logits = signs.clone()  # margin 1: error 0
    logits[0, 0, [1, 3]] = 0.0  # error exactly 1: pixels 1 (fg) and 3 (bg) mispredicted
    # predicted foreground {0, 3, 4} vs ground truth {0, 1, 4}: IoU 2/4
    assert lovasz_hinge(logits, labels).item() == pytest.approx(0.5, abs=1e-7)


def test_lovasz_softmax_hard_probabilities_equal_mean_jaccard_loss():
    labels = torch.tensor([[[0, 0, 1, 1, 2]]])
    predicted = torch.tensor([[[0, 1, 1, 2, 2]]])
    probs = F.one_hot(predicted, 3).permute(0, 3, 1, 2).float()
    # 1 - IoU per class: 1 - 1/2, 1 - 1/3, 1 - 1/2
    expected = (1 / 2 + 2 / 3 + 1 / 2) / 3
    assert lovasz_softmax(probs, labels).item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_hinge_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(1, 2, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (1, 2, 4), generator=generator)
    expected = brute_force_hinge(logits.flatten().tolist(), labels.flatten().tolist())
    assert lovasz_hinge(logits, labels).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("classes", ["present", "all", [1, 2]])
def test_lovasz_softmax_matches_brute_force(classes):
    generator = torch.Generator().manual_seed(3)
    probs = (2 * torch.randn(1, 3, 2, 4, generator=generator, dtype=torch.float64)).softmax(1)
    labels = torch.tensor([[[0, 2, 2, 0], [0, 0, 2, 0]]])  # class 1 absent
    class_list = {"present": [0, 2], "all": [0, 1, 2]}.get(str(classes), classes)
    expected = brute_force_softmax(pixels_of(probs, 0), labels.flatten().tolist(), class_list)
    loss = lovasz_softmax(probs, labels, classes=classes)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def two_image_case():
    generator = torch.Generator().manual_seed(4)
    logits = 2 * torch.randn(2, 2, 3, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[[1, 0, 0], [1, 1, 0]], [[0, 0, 0], [0, 1, 0]]])
    return logits, labels


def test_lovasz_per_image_versus_batch():
    logits, labels = two_image_case()
    flat_labels = [labels[b].flatten().tolist() for b in range(2)]
    flat_logits = [logits[b].flatten().tolist() for b in range(2)]
    image_mean = sum(brute_force_hinge(flat_logits[b], flat_labels[b]) for b in range(2)) / 2
    batch = brute_force_hinge(logits.flatten().tolist(), labels.flatten().tolist())
    assert lovasz_hinge(logits, labels, per_image=True).item() == pytest.approx(image_mean, abs=1e-12)
    assert lovasz_hinge(logits, labels, per_image=False).item() == pytest.approx(batch, abs=1e-12)
    assert abs(batch - image_mean) > 1e-3

    probs = torch.stack([-logits, logits], 1).softmax(1)
    per_image = [brute_force_softmax(pixels_of(probs, b), flat_labels[b], [0, 1]) for b in range(2)]
    image_mean = sum(per_image) / 2
    pixels = pixels_of(probs, 0) + pixels_of(probs, 1)
    batch = brute_force_softmax(pixels, labels.flatten().tolist(), [0, 1])
    assert lovasz_softmax(probs, labels, per_image=True).item() == pytest.approx(image_mean, abs=1e-12)
    assert lovasz_softmax(probs, labels, per_image=False).item() == pytest.approx(batch, abs=1e-12)
    assert abs(batch - image_mean) > 1e-3


@pytest.mark.parametrize("per_image", [False, True])
def test_lovasz_ignore_index_drops_pixels(per_image):
    logits, labels = two_image_case()
    labels = labels.clone()
    labels[0, 0, 1] = labels[0, 1, 2] = 255
    labels[1] = 255  # image 1 fully ignored: left out of the per-image mean
    kept = labels.flatten() != 255
    expected = brute_force_hinge(logits.flatten()[kept].tolist(), labels.flatten()[kept].tolist())
    loss = lovasz_hinge(logits, labels, per_image, ignore_index=255)
    assert loss.item() == pytest.approx(expected, abs=1e-12)

    probs = torch.stack([-logits, logits], 1).softmax(1)
    pixels = [p for p, k in zip(pixels_of(probs, 0) + pixels_of(probs, 1), kept) if k]
    expected = brute_force_softmax(pixels, labels.flatten()[kept].tolist(), [0, 1])
    loss = lovasz_softmax(probs, labels, per_image=per_image, ignore_index=255)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_lovasz_loss_module_modes():
    logits, labels = two_image_case()
    two_class = torch.stack([torch.zeros_like(logits), logits], 1)  # margin logits[:,1]-logits[:,0]
    hinge = LovaszLoss(mode="hinge", per_image=True)
    expected = lovasz_hinge(logits, labels).item()
    assert hinge(two_class, labels).item() == pytest.approx(expected, abs=1e-12)
    assert hinge(logits.unsqueeze(1), labels).item() == pytest.approx(expected, abs=1e-12)
    softmax = LovaszLoss(mode="softmax")
    expected = lovasz_softmax(two_class.softmax(1), labels).item()
    assert softmax(two_class, labels).item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(DataError, match="hinge mode needs 1 or 2 logit channels, got 3"):
        hinge(torch.zeros(2, 3, 2, 3), labels)


# --- pixel KD and channel-wise KD ----------------------------------------------------------------


def test_pixel_kl_by_hand():
    # T = 2: softmax(t/T) = (1/4, 3/4), softmax(s/T) = (1/2, 1/2)
    # T^2 * (1/4 ln(1/2) + 3/4 ln(3/2)) = ln(1/2) + 3 ln(3/2) = ln(27/16)
    student = torch.zeros(1, 2, 1, 1)
    teacher = torch.tensor([0.0, 2 * LN3]).reshape(1, 2, 1, 1)
    loss = pixel_kl_divergence(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(math.log(27 / 16), abs=1e-6)
    assert KDLoss(temperature=2.0)(student, teacher).item() == pytest.approx(loss.item())


def test_pixel_kl_equal_logits_is_zero_and_scales_with_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    assert pixel_kl_divergence(teacher, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    unscaled = pixel_kl_divergence(student / 4.0, teacher / 4.0, temperature=1.0)
    scaled = pixel_kl_divergence(student, teacher, 4.0)
    assert scaled.item() == pytest.approx(16 * unscaled.item(), rel=1e-5)


def test_pixel_kl_none_is_per_pixel_map():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    per_pixel = pixel_kl_divergence(student, teacher, 4.0, reduction="none")
    assert per_pixel.shape == (2, 4, 5)
    mean = pixel_kl_divergence(student, teacher, 4.0, reduction="mean")
    assert per_pixel.mean().item() == pytest.approx(mean.item(), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        pixel_kl_divergence(student, teacher[:, :2], 4.0)


def test_channel_wise_divergence():
    torch.manual_seed(0)
    features = torch.randn(2, 3, 4, 4)
    assert channel_wise_divergence(features, features).item() == pytest.approx(0.0, abs=1e-6)
    # channel 0 as in the pixel KL case (over 2 positions), channel 1 identical: mean over B*C = 2
    same = torch.randn(2)
    student = torch.stack([torch.zeros(2), same]).reshape(1, 2, 1, 2)
    teacher = torch.stack([torch.tensor([0.0, 2 * LN3]), same]).reshape(1, 2, 1, 2)
    expected = math.log(27 / 16) / 2
    loss = channel_wise_divergence(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert ChannelWiseKDLoss(2.0)(student, teacher).item() == pytest.approx(expected, abs=1e-6)


# --- feature distillation ------------------------------------------------------------------------


def test_attention_map_by_hand():
    root2 = math.sqrt(2.0)
    features = torch.tensor([[[[1.0, -root2], [root2, 0.0]]]])  # |f|^2 = 1, 2, 2, 0; norm 3
    assert torch.allclose(attention_map(features), torch.tensor([[1 / 3, 2 / 3, 2 / 3, 0.0]]))
    # channel mean of squares: (1+1)/2, (4+0)/2, (0+4)/2, 0 -> 1, 2, 2, 0
    two_channels = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[1.0, 0.0], [-2.0, 0.0]]]])
    assert torch.allclose(attention_map(two_channels), torch.tensor([[1 / 3, 2 / 3, 2 / 3, 0.0]]))


@pytest.mark.parametrize("p", [2.0, 4.0])
def test_attention_transfer_ignores_channel_order_and_scale(p):
    torch.manual_seed(0)
    teacher = torch.randn(2, 4, 3, 3)
    student = 5.0 * teacher[:, [2, 0, 3, 1]]
    assert attention_transfer_loss(student, teacher, p).item() == pytest.approx(0.0, abs=1e-7)
    assert attention_transfer_loss(torch.randn(2, 4, 3, 3), teacher, p).item() > 1e-3


def test_attention_transfer_resizes_student_map():
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 2, 2)
    # 2x2 blocks: bilinear 4x4 -> 2x2 averages each block, giving back the teacher's map
    student = teacher.repeat_interleave(2, -1).repeat_interleave(2, -2)[:, [1, 2, 0]]
    unrelated_student, unrelated_teacher = torch.randn(2, 5, 4, 4), torch.randn(2, 8, 2, 2)
    loss = AttentionTransferLoss()([student, unrelated_student], [teacher, unrelated_teacher])
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() > 1e-3
    with pytest.raises(ValueError, match="AttentionTransferLoss: got 1 student and 2 teacher"):
        AttentionTransferLoss()([student], [teacher, teacher])


def test_feature_mse_identity_adapter_is_plain_mse():
    torch.manual_seed(0)
    loss_fn = FeatureMSELoss(student_channels=[3, 4], teacher_channels=[3, 6])
    with torch.no_grad():
        loss_fn.adapters[0].weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
        loss_fn.adapters[0].bias.zero_()
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)
    other_student, other_teacher = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 4, 4)
    upsampled = F.interpolate(student, size=(8, 8), mode="bilinear", align_corners=False)
    adapted_other = loss_fn.adapters[1](other_student)
    expected = (F.mse_loss(upsampled, teacher) + F.mse_loss(adapted_other, other_teacher)) / 2
    loss = loss_fn([student, other_student], [teacher, other_teacher])
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_feature_mse_adapters_train():
    torch.manual_seed(0)
    loss_fn = FeatureMSELoss([4], [6])
    student = torch.randn(4, 4, 5, 5)
    teacher = torch.einsum("oc,bchw->bohw", torch.randn(6, 4), student)  # reachable by a 1x1 conv
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    first = loss_fn([student], [teacher]).item()
    for _ in range(20):
        optimizer.zero_grad()
        loss_fn([student], [teacher]).backward()
        optimizer.step()
    # measured over seeds 0-15, 1 and 2 threads: last / first 0.20-0.31
    assert loss_fn([student], [teacher]).item() < 0.5 * first


def test_feature_mse_clear_errors():
    loss_fn = FeatureMSELoss([3, 4], [6, 8])
    student, teacher = torch.zeros(1, 3, 2, 2), torch.zeros(1, 6, 2, 2)
    with pytest.raises(ValueError, match="got 1 student and 1 teacher feature maps, built for 2 pairs"):
        loss_fn([student], [teacher])
    with pytest.raises(ValueError, match="need the same length"):
        FeatureMSELoss([3, 4], [6])
    with pytest.raises(ValueError, match="ChannelWiseFeatureLoss: temperature must be > 0, got 0"):
        ChannelWiseFeatureLoss([3], [6], temperature=0)


def test_region_affinity_by_hand():
    # features (B=2, C=2, 1x2); labels (2, 2, 4) resized nearest to 1x2 -> fg pixel 0, bg pixel 1
    student = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]], [[[2.0, 0.0]], [[1.0, 3.0]]]])
    teacher = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[2.0, 0.0]], [[1.0, 3.0]]]])
    labels = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]]).reshape(1, 2, 4).repeat(2, 1, 1)
    # sample 0: student cos([1,0],[1,1]) = 1/sqrt2, teacher cos([1,0],[0,1]) = 0; sample 1 equal
    assert region_affinity_loss(student, teacher, labels).item() == pytest.approx(0.25, abs=1e-6)
    wide_teacher = torch.cat([teacher, torch.zeros(2, 3, 1, 2)], 1)  # extra channels of zeros
    loss = RegionAffinityLoss()([student, student], [wide_teacher, student], labels)
    assert loss.item() == pytest.approx(0.125, abs=1e-6)


def test_region_affinity_identical_features_is_zero():
    torch.manual_seed(0)
    features = torch.randn(3, 4, 6, 6)
    labels = torch.randint(0, 2, (3, 12, 12))
    labels[2] = 0  # no foreground at all
    assert region_affinity_loss(features, features, labels).item() == pytest.approx(0.0, abs=1e-12)


# --- gradients -----------------------------------------------------------------------------------

LABELS = torch.tensor([[[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]] * 2)
TEACHER = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5))
LOSSES = {
    "dice": lambda s: DiceLoss()(s, LABELS),
    "lovasz_softmax": lambda s: LovaszLoss("softmax")(s, LABELS),
    "lovasz_hinge": lambda s: LovaszLoss("hinge", per_image=True)(s, LABELS),
    "kd": lambda s: KDLoss()(s, TEACHER),
    "channel_wise": lambda s: ChannelWiseKDLoss()(s, TEACHER),
    "attention": lambda s: AttentionTransferLoss()([s], [TEACHER[:, :, :2, :2]]),
    "feature_mse": lambda s: FeatureMSELoss([2], [3])([s], [torch.randn(2, 3, 2, 2)]),
    "region_affinity": lambda s: RegionAffinityLoss()([s], [TEACHER], LABELS),
}


@pytest.mark.parametrize("name", LOSSES)
def test_losses_backpropagate_finite_gradients(name):
    generator = torch.Generator().manual_seed(6)
    student = torch.randn(2, 2, 4, 4, generator=generator, requires_grad=True)
    LOSSES[name](student).backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


# --- named weighted terms ------------------------------------------------------------------------


def test_weighted_sum_value_and_zero_weights():
    skipped = torch.tensor(float("nan"), requires_grad=True)
    dice = torch.tensor(0.5, requires_grad=True)
    terms = {"dice": dice, "kd": torch.tensor(2.0), "at": skipped}
    total = weighted_sum(terms, {"dice": 1.0, "kd": 0.1, "at": 0.0})
    assert total.item() == pytest.approx(0.7)
    total.backward()
    assert dice.grad.item() == 1.0 and skipped.grad is None


def test_weighted_sum_and_check_name_unknown_terms():
    terms = {"dice": torch.tensor(0.5), "kd": torch.tensor(2.0)}
    # the config's names are checked once, at construction (check_loss_weights); a weighted term
    # the method did not compute is the method's bug
    message = r"^student: loss term 'kld' has a weight but was not computed; computed: dice, kd$"
    with pytest.raises(ValueError, match=message):
        weighted_sum(terms, {"kld": 1.0}, owner="student")
    message = r"^SegKD: unknown loss term 'lovaz' in loss_weights; available: dice, lovasz$"
    with pytest.raises(DataError, match=message):
        check_loss_weights({"dice": 1.0, "lovaz": 1.0}, ["dice", "lovasz"], "SegKD")
    check_loss_weights({"dice": 1.0}, ["dice", "lovasz"], "SegKD")


# --- losses chosen by name -----------------------------------------------------------------------

FEATURE_CONFIGS = {
    "attention": "attention",
    "mse": {"name": "mse"},
    "channel_wise": {"name": "channel_wise", "temperature": 2},
    "region_affinity": "region_affinity",
}


@pytest.mark.parametrize("name", sorted(FEATURE_LOSSES))
def test_every_feature_loss_builds_from_config_and_trains(name):
    choice = choose_loss(FEATURE_CONFIGS[name], FEATURE_LOSSES, "feature_loss")
    loss_fn = build_feature_loss(choice, [2], [3])
    student = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(7), requires_grad=True)
    params = [student, *loss_fn.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1)
    loss = loss_fn([student], [torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(8))], LABELS)
    loss.backward()
    optimizer.step()
    assert loss.shape == () and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES))
def test_every_logit_loss_builds_from_config_and_trains(name):
    choice = choose_loss({"name": name}, LOGIT_LOSSES, "logit_loss")
    student = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(9), requires_grad=True)
    teachers = torch.stack([TEACHER, TEACHER.flip(1)])
    weights = torch.full((2, 2, 4, 4), 0.5)
    logit_loss(choice, student, teachers, weights, 2.0).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # one teacher of weight 1: the single-teacher loss
    single = logit_loss(choice, student, TEACHER[None], torch.ones(1, 2, 4, 4), 2.0)
    reference = pixel_kl_divergence if name == "kd" else channel_wise_divergence
    assert single.item() == pytest.approx(reference(student, TEACHER, 2.0).item(), rel=1e-5)


def test_loss_config_errors_are_one_line():
    with pytest.raises(
        DataError,
        match=r"^feature_loss: unknown loss 'atention'; known: attention, channel_wise, mse, region_affinity$",
    ):
        choose_loss("atention", FEATURE_LOSSES, "feature_loss")
    with pytest.raises(DataError, match=r"^logit_loss: give the loss's name; known: channel_wise, kd$"):
        choose_loss({"temperature": 2}, LOGIT_LOSSES, "logit_loss")
    with pytest.raises(DataError, match=r"^feature_loss: loss 'mse' has no option 'p'; its options: none$"):
        choose_loss({"name": "mse", "p": 2}, FEATURE_LOSSES, "feature_loss")
    with pytest.raises(DataError, match=r"^feature_loss.temperature must be a number > 0, got -1$"):
        choose_loss({"name": "channel_wise", "temperature": -1}, FEATURE_LOSSES, "feature_loss")
    assert choose_loss("attention", FEATURE_LOSSES, "feature_loss").options == {"p": 2.0}


def test_programming_errors_are_value_errors():
    """Mismatched tensors and bad arguments come from code, not from a user's files: ValueError."""
    with pytest.raises(ValueError, match="soft_target_kl: student logits"):
        soft_target_kl(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))
    with pytest.raises(ValueError, match=r"channel_wise_divergence: .* \(1, 2, 3, 2\) must have the same shape"):
        channel_wise_divergence(torch.zeros(1, 2, 2, 3), torch.zeros(1, 2, 3, 2))  # same H*W, other H x W
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none', got 'sum'"):
        soft_kl_divergence(torch.zeros(1, 2), torch.zeros(1, 2), reduction="sum")
    for loss in (KDLoss, ChannelWiseKDLoss):
        with pytest.raises(ValueError, match=f"{loss.__name__}: temperature must be > 0, got 0"):
            loss(temperature=0)
    with pytest.raises(ValueError, match="LovaszLoss: mode must be 'softmax' or 'hinge'"):
        LovaszLoss(mode="jaccard")
