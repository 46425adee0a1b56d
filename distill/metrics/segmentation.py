"""Per-volume segmentation metrics (3D Dice, HD95 in mm) and their per-site aggregation."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from torchmetrics import Metric

#: The six sites of the multi-site prostate T2 MRI release, in their usual order.
PROSTATE_SITES: tuple[str, ...] = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")


def volume_dice_hd95(pred: torch.Tensor, label: torch.Tensor, spacing: Sequence[float]) -> tuple[float, float]:
    """3D Dice and 95th-percentile Hausdorff distance of one binary volume (MONAI).

    Args:
        pred, label: (D, H, W) binary masks.
        spacing: voxel size in mm along (D, H, W).

    Returns:
        ``(dice, hd95_mm)``. An empty prediction of a non-empty label has Dice 0 and, since its
        surface distance is undefined, HD95 = the volume's diagonal in mm (the worst possible
        value) instead of MONAI's NaN, so that misses count against the mean rather than
        vanishing from it.
    """
    pred_5d = pred.bool()[None, None].float()
    label_5d = label.bool()[None, None].float()
    dice = compute_dice(pred_5d, label_5d, include_background=True).item()
    if pred_5d.sum() == 0 or label_5d.sum() == 0:
        extent = torch.tensor(pred.shape, dtype=torch.float64) * torch.as_tensor(spacing, dtype=torch.float64)
        return (0.0 if label_5d.sum() > 0 else float("nan")), float(extent.norm())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(
            pred_5d, label_5d, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
        ).item()
    return dice, hd95


class PerGroupVolumeMetrics(Metric):
    """Mean Dice/HD95 over cases, overall and per group (site); DDP-safe (states are gathered).

    ``update(dice, hd95, group)`` once per case; ``compute()`` returns
    ``{"dice": m, "hd95": m, "dice/<GROUP>": m, "hd95/<GROUP>": m, ...}`` for the groups seen.
    """

    full_state_update = False

    def __init__(self, groups: Sequence[str]) -> None:
        super().__init__()
        self.groups = list(groups)
        self.add_state("dice", default=[], dist_reduce_fx="cat")
        self.add_state("hd95", default=[], dist_reduce_fx="cat")
        self.add_state("group", default=[], dist_reduce_fx="cat")

    def update(self, dice: float, hd95: float, group: str) -> None:
        self.dice.append(torch.tensor([dice], dtype=torch.float64, device=self.device))
        self.hd95.append(torch.tensor([hd95], dtype=torch.float64, device=self.device))
        self.group.append(torch.tensor([self.groups.index(group)], device=self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        cat = lambda state: torch.cat(state) if isinstance(state, list) else state  # noqa: E731
        dice, hd95, group = cat(self.dice), cat(self.hd95), cat(self.group)
        results = {"dice": dice.nanmean(), "hd95": hd95.nanmean()}
        for index, name in enumerate(self.groups):
            in_group = group == index
            if in_group.any():
                results[f"dice/{name}"] = dice[in_group].nanmean()
                results[f"hd95/{name}"] = hd95[in_group].nanmean()
        return results
