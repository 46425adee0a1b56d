"""Per-volume segmentation metrics (3D Dice, HD95 in mm) and their per-site aggregation."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from torchmetrics import Metric


def volume_dice_hd95(pred: torch.Tensor, label: torch.Tensor, spacing: Sequence[float]) -> tuple[float, float]:
    """3D Dice and 95th-percentile Hausdorff distance of one binary volume (MONAI).

    Args:
        pred, label: (D, H, W) binary masks.
        spacing: voxel size in mm along (D, H, W).

    Returns:
        ``(dice, hd95_mm)``. Empty masks follow MONAI's conventions: Dice as ``DiceMetric(ignore_empty=False)``
        (an empty prediction of an empty label scores 1, anything else against an empty label 0),
        and an empty prediction of an empty label has HD95 NaN, as ``HausdorffDistanceMetric``
        gives it (no surface to measure), which the NaN-skipping means of
        :class:`PerGroupVolumeMetrics` leave out, like MONAI's reductions. When exactly one of the
        two is empty, MONAI's HD95 is NaN too; here it is the volume's diagonal in mm (the worst
        possible value) instead, so that misses and false alarms count against the mean rather
        than vanishing from it.
    """
    pred_5d = pred.bool()[None, None].float()
    label_5d = label.bool()[None, None].float()
    dice = compute_dice(pred_5d, label_5d, include_background=True, ignore_empty=False).item()
    pred_empty, label_empty = not pred_5d.any(), not label_5d.any()
    if pred_empty and label_empty:
        return dice, float("nan")
    if pred_empty or label_empty:
        extent = torch.tensor(pred.shape, dtype=torch.float64) * torch.as_tensor(spacing, dtype=torch.float64)
        return dice, float(extent.norm())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(
            pred_5d, label_5d, include_background=True, percentile=95, spacing=[float(s) for s in spacing]
        ).item()
    return dice, hd95


def volume_key(name: str) -> int:
    """A stable signed 64-bit identity of a volume name (e.g. its image path), the same in every process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little", signed=True)


class PerGroupVolumeMetrics(Metric):
    """Mean Dice/HD95 over cases, overall and per group (site); DDP-safe (states are gathered).

    ``update(dice, hd95, group, volume, empty_label)`` once per case, ``volume`` naming it (e.g. its
    image path), ``empty_label`` saying that its mask has no foreground (scored as
    :func:`volume_dice_hd95` says; listed by :meth:`per_volume`); ``compute()`` returns ``{"dice": m, "hd95": m, "dice/<GROUP>": m, "hd95/<GROUP>": m, ...}`` for
    the groups seen. Every volume counts once: Lightning's distributed sampler repeats volumes to
    give every rank as many, and the repeats are dropped after gathering (by ``volume``), so the
    results do not depend on the number of processes.
    """

    full_state_update = False

    def __init__(self, groups: Sequence[str]) -> None:
        super().__init__()
        self.groups = list(groups)
        self.add_state("dice", default=[], dist_reduce_fx="cat")
        self.add_state("hd95", default=[], dist_reduce_fx="cat")
        self.add_state("group", default=[], dist_reduce_fx="cat")
        self.add_state("volume", default=[], dist_reduce_fx="cat")
        self.add_state("empty_label", default=[], dist_reduce_fx="cat")

    def update(self, dice: float, hd95: float, group: str, volume: str, empty_label: bool = False) -> None:
        self.dice.append(torch.tensor([dice], dtype=torch.float64, device=self.device))
        self.hd95.append(torch.tensor([hd95], dtype=torch.float64, device=self.device))
        self.group.append(torch.tensor([self.groups.index(group)], device=self.device))
        self.volume.append(torch.tensor([volume_key(volume)], dtype=torch.int64, device=self.device))
        self.empty_label.append(torch.tensor([int(empty_label)], dtype=torch.uint8, device=self.device))

    def _distinct_volumes(self) -> dict[str, torch.Tensor]:
        """The current states, each volume once, in the order of :func:`volume_key` (independent of ranks)."""
        cat = lambda state: torch.cat(state) if isinstance(state, list) else state  # noqa: E731
        keys, order = torch.sort(cat(self.volume), stable=True)
        first = torch.ones_like(keys, dtype=torch.bool)
        first[1:] = keys[1:] != keys[:-1]
        kept = order[first]
        return {
            "volume": keys[first],
            "group": cat(self.group)[kept],
            "dice": cat(self.dice)[kept],
            "hd95": cat(self.hd95)[kept],
            "empty_label": cat(self.empty_label)[kept].bool(),
        }

    def per_volume(self) -> dict[str, torch.Tensor]:
        """``{"volume": (N,) int64 volume_key, "group": (N,) index into groups, "dice": (N,), "hd95": (N,),
        "empty_label": (N,) bool}`` over the N distinct volumes of all ranks (a collective under DDP: call it on every rank)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            return self._distinct_volumes()

    def compute(self) -> dict[str, torch.Tensor]:
        volumes = self._distinct_volumes()
        dice, hd95, group = volumes["dice"], volumes["hd95"], volumes["group"]
        results = {"dice": dice.nanmean(), "hd95": hd95.nanmean()}
        for index, name in enumerate(self.groups):
            in_group = group == index
            if in_group.any():
                results[f"dice/{name}"] = dice[in_group].nanmean()
                results[f"hd95/{name}"] = hd95[in_group].nanmean()
        return results
