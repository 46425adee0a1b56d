"""Supervised segmentation losses: soft Dice (MONAI) and Lovasz hinge / Lovasz-softmax.

The Lovasz losses (Berman, Rannen Triki, Blaschko, CVPR 2018) are the Lovasz extension of the
Jaccard loss: a convex, piecewise-linear surrogate that equals ``1 - IoU`` exactly when the
per-pixel errors are 0/1. Both are computed for all images (and classes) at once with one sort
along the pixel axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import monai.losses
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import DataError

__all__ = ["DiceLoss", "LovaszLoss", "lovasz_grad", "lovasz_hinge", "lovasz_softmax"]


def _check_logits_target(logits: Tensor, target: Tensor, owner: str) -> None:
    """ValueError unless ``logits`` is (B, C, *spatial) and ``target`` is (B, *spatial)."""
    if logits.ndim != target.ndim + 1 or logits.shape[:1] + logits.shape[2:] != target.shape:
        raise ValueError(
            f"{owner}: logits of shape {tuple(logits.shape)} (B, C, H, W) do not match target of "
            f"shape {tuple(target.shape)} (B, H, W)"
        )


class DiceLoss(nn.Module):
    """Soft Dice loss on softmax probabilities against integer labels (MONAI ``DiceLoss``).

    Per sample and class ``1 - (2 sum(p g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)``,
    averaged over samples and classes. A binary task is a 2-class softmax (the project default);
    ``include_background=False`` then scores the foreground class only.

    Args:
        include_background: whether class 0 counts in the average.
        smooth_nr: added to the numerator (keeps an empty class with an empty prediction at 0).
        smooth_dr: added to the denominator (avoids 0/0).
    """

    def __init__(self, include_background: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5) -> None:
        super().__init__()
        self.dice = monai.losses.DiceLoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits (B, C, H, W) float, target (B, H, W) long with values in [0, C) -> scalar."""
        _check_logits_target(logits, target, "DiceLoss")
        return self.dice(logits, target.unsqueeze(1))


def lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors.

    Args:
        gt_sorted: (..., N) 0/1 ground truth of one class, pixels ordered by decreasing error
            (bool, integer or float).

    Returns:
        (..., N) ``Delta(A_i) - Delta(A_{i-1})``, where ``A_i`` holds the first ``i`` pixels
        and ``Delta(A) = 1 - |G \\ A| / |G u A|`` is the Jaccard loss when the pixels in ``A``
        are mispredicted (``Delta`` of the empty set is 0). Float ``gt_sorted`` keeps its
        dtype; other inputs give the default float dtype.
    """
    gt = gt_sorted if gt_sorted.is_floating_point() else gt_sorted.to(torch.get_default_dtype())
    gt_total = gt.sum(-1, keepdim=True)
    intersection = gt_total - gt.cumsum(-1)
    union = gt_total + (1.0 - gt).cumsum(-1)  # >= 1 everywhere, so no division by zero
    jaccard_loss = 1.0 - intersection / union
    return torch.diff(jaccard_loss, dim=-1, prepend=torch.zeros_like(jaccard_loss[..., :1]))


def _lovasz_extension(errors: Tensor, gt: Tensor) -> Tensor:
    """Lovasz extension of the Jaccard loss: errors (..., N) >= 0, gt (..., N) bool -> (...)."""
    errors_sorted, order = errors.sort(dim=-1, descending=True)
    return (errors_sorted * lovasz_grad(gt.gather(-1, order).to(errors.dtype))).sum(-1)


def _mean_over_rows(losses: Tensor, has_pixels: Tensor) -> Tensor:
    """Mean of ``losses`` (R,) over the rows that have a valid pixel; 0 when none has."""
    weights = has_pixels.to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


def _valid_mask(labels: Tensor, ignore_index: int | None) -> Tensor:
    """(B, H, W) bool: pixels that count (not equal to ``ignore_index``)."""
    if ignore_index is None:
        return torch.ones_like(labels, dtype=torch.bool)
    return labels != ignore_index


def lovasz_hinge(logits: Tensor, labels: Tensor, per_image: bool = True, ignore_index: int | None = None) -> Tensor:
    """Binary Lovasz hinge loss.

    Errors are the hinge ``relu(1 - logit * sign)`` with ``sign = +1`` for foreground and
    ``-1`` for background; the loss is their Lovasz extension of the foreground Jaccard loss.

    Args:
        logits: (B, H, W) foreground logit per pixel (real, not a probability).
        labels: (B, H, W) binary labels in {0, 1} (or ``ignore_index``).
        per_image: average the loss of each image (True) or compute it over the whole batch
            as one image (False).
        ignore_index: label value whose pixels are left out.

    Returns:
        scalar. With ``per_image``, images without a valid pixel are left out of the mean.
    """
    valid = _valid_mask(labels, ignore_index)
    foreground = (labels == 1) & valid
    signs = foreground.to(logits.dtype) * 2.0 - 1.0
    # Ignored pixels get error 0 and no foreground: they sort behind every positive error and
    # so cannot change the loss.
    errors = F.relu(1.0 - logits * signs) * valid
    rows = logits.shape[0] if per_image else 1
    losses = _lovasz_extension(errors.reshape(rows, -1), foreground.reshape(rows, -1))
    return _mean_over_rows(losses, valid.reshape(rows, -1).any(-1))


def lovasz_softmax(
    probs: Tensor,
    labels: Tensor,
    classes: Literal["present", "all"] | Sequence[int] = "present",
    per_image: bool = False,
    ignore_index: int | None = None,
) -> Tensor:
    """Multi-class Lovasz-softmax loss.

    For each class ``c`` the errors ``|1[label == c] - probs[:, c]|`` enter the Lovasz extension
    of that class's Jaccard loss; the loss is the mean over the chosen classes.

    Args:
        probs: (B, C, H, W) class probabilities (softmax output), C >= 2.
        labels: (B, H, W) integer labels in [0, C) (or ``ignore_index``).
        classes: "present" averages over the classes present in the labels (of each image when
            ``per_image``), "all" over every class, or an explicit list of class ids.
        per_image: average the loss of each image (True) or treat the batch as one image.
        ignore_index: label value whose pixels are left out.

    Returns:
        scalar. Images without a valid pixel are left out of the mean.
    """
    num_classes = probs.shape[1]
    if classes in ("present", "all"):
        class_ids = torch.arange(num_classes, device=probs.device)
    else:
        class_ids = torch.as_tensor(list(classes), dtype=torch.long, device=probs.device)
    valid = _valid_mask(labels, ignore_index).flatten(1)  # (B, N)
    class_probs = probs.index_select(1, class_ids).flatten(2)  # (B, K, N)
    foreground = (labels.flatten(1).unsqueeze(1) == class_ids[:, None]) & valid.unsqueeze(1)
    errors = (foreground.to(probs.dtype) - class_probs).abs() * valid.unsqueeze(1)
    if not per_image:  # the batch as one image: (1, K, B * N)
        errors = errors.transpose(0, 1).reshape(1, len(class_ids), -1)
        foreground = foreground.transpose(0, 1).reshape(1, len(class_ids), -1)
        valid = valid.reshape(1, -1)
    losses = _lovasz_extension(errors, foreground)  # (rows, K)
    if classes == "present":
        counted = foreground.any(-1).to(losses.dtype)
    else:
        counted = torch.ones_like(losses)
    per_row = (losses * counted).sum(-1) / counted.sum(-1).clamp_min(1.0)
    return _mean_over_rows(per_row, valid.any(-1))


class LovaszLoss(nn.Module):
    """Lovasz loss on logits, as the Lovasz-softmax or the binary Lovasz hinge.

    Args:
        mode: "softmax" applies softmax over C and uses :func:`lovasz_softmax` (present
            classes); "hinge" uses :func:`lovasz_hinge` on the foreground logit, which is
            ``logits[:, 0]`` for C == 1 and ``logits[:, 1] - logits[:, 0]`` for C == 2 (the
            margin of a 2-class softmax).
        per_image: average per image instead of over the batch as one image.
        ignore_index: label value whose pixels are left out.
    """

    def __init__(
        self,
        mode: Literal["softmax", "hinge"] = "softmax",
        per_image: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("softmax", "hinge"):
            raise ValueError(f"LovaszLoss: mode must be 'softmax' or 'hinge', got {mode!r}")
        self.mode = mode
        self.per_image = per_image
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits (B, C, H, W), target (B, H, W) long -> scalar."""
        _check_logits_target(logits, target, "LovaszLoss")
        if self.mode == "softmax":
            return lovasz_softmax(logits.softmax(1), target, per_image=self.per_image, ignore_index=self.ignore_index)
        if logits.shape[1] == 1:
            foreground_logit = logits[:, 0]
        elif logits.shape[1] == 2:
            foreground_logit = logits[:, 1] - logits[:, 0]
        else:
            raise DataError(
                f"LovaszLoss: hinge mode needs 1 or 2 logit channels, got {logits.shape[1]}; "
                "use mode='softmax' for more classes"
            )
        return lovasz_hinge(foreground_logit, target, self.per_image, self.ignore_index)
