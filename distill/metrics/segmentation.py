"""Per-volume segmentation metrics (3D Dice, HD95 in mm, per foreground class) and their per-site aggregation."""

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


def volume_class_dice_hd95(
    pred: torch.Tensor, label: torch.Tensor, spacing: Sequence[float], num_classes: int
) -> tuple[list[float], list[float]]:
    """:func:`volume_dice_hd95` of every foreground class c = 1 .. num_classes - 1 of (D, H, W)
    class-index volumes, one class against the rest: ``([dice_1, ...], [hd95_1, ...])``."""
    scores = [volume_dice_hd95(pred == c, label == c, spacing) for c in range(1, num_classes)]
    return [dice for dice, _ in scores], [hd95 for _, hd95 in scores]


def volume_key(name: str) -> int:
    """A stable signed 64-bit identity of a volume name (e.g. its image path), the same in every process."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little", signed=True)


class PerGroupVolumeMetrics(Metric):
    """Mean Dice/HD95 (and ECE) over cases, overall and per group (site); DDP-safe (states are gathered).

    ``update(dice, hd95, group, volume, empty_label, ece, reliability)`` once per case, ``dice`` and ``hd95`` a value
    or one per foreground class (:func:`volume_class_dice_hd95`), ``volume`` naming it (e.g. its
    image path), ``empty_label`` saying that its mask has no foreground (scored as
    :func:`volume_dice_hd95` says; listed by :meth:`per_volume`); ``compute()`` returns
    ``{"dice": m, "hd95": m, "dice/<GROUP>": m, "hd95/<GROUP>": m, ...}`` for the groups seen, a
    case's value being the (NaN-skipping) mean over its classes, and with ``class_names`` (more
    than one class) also ``"dice_<CLASS>"`` and ``"hd95_<CLASS>"``, the mean over cases of each
    class. With ``ece`` (the volume's expected calibration error, :mod:`distill.metrics.calibration`)
    it also returns ``"ece"`` and ``"ece/<GROUP>"``, means over cases, and :meth:`reliability` sums the
    volumes' ``reliability`` bins (3, bins + 1). Every volume counts once: Lightning's distributed sampler repeats volumes to
    give every rank as many, and the repeats are dropped after gathering (by ``volume``), so the
    results do not depend on the number of processes.
    """

    full_state_update = False

    def __init__(self, groups: Sequence[str], class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.groups = list(groups)
        self.class_names = list(class_names or [])
        self.add_state("dice", default=[], dist_reduce_fx="cat")
        self.add_state("hd95", default=[], dist_reduce_fx="cat")
        self.add_state("group", default=[], dist_reduce_fx="cat")
        self.add_state("volume", default=[], dist_reduce_fx="cat")
        self.add_state("empty_label", default=[], dist_reduce_fx="cat")
        self.add_state("ece", default=[], dist_reduce_fx="cat")
        self.add_state("reliability_bins", default=[], dist_reduce_fx="cat")

    def update(
        self,
        dice: float | Sequence[float],
        hd95: float | Sequence[float],
        group: str,
        volume: str,
        empty_label: bool = False,
        ece: float | None = None,
        reliability: torch.Tensor | None = None,
    ) -> None:
        self.dice.append(torch.tensor(dice, dtype=torch.float64, device=self.device).reshape(1, -1))
        self.hd95.append(torch.tensor(hd95, dtype=torch.float64, device=self.device).reshape(1, -1))
        self.group.append(torch.tensor([self.groups.index(group)], device=self.device))
        self.volume.append(torch.tensor([volume_key(volume)], dtype=torch.int64, device=self.device))
        self.empty_label.append(torch.tensor([int(empty_label)], dtype=torch.uint8, device=self.device))
        self.ece.append(torch.tensor([float("nan") if ece is None else ece], dtype=torch.float64, device=self.device))
        if reliability is not None:
            self.reliability_bins.append(reliability.to(self.device, torch.float64)[None])

    def _distinct_volumes(self) -> dict[str, torch.Tensor]:
        """The current states, each volume once, in the order of :func:`volume_key` (independent of ranks)."""
        keys, kept = _distinct(_cat(self.volume))
        return {
            "volume": keys,
            "group": _cat(self.group)[kept],
            "class_dice": _cat(self.dice)[kept],
            "class_hd95": _cat(self.hd95)[kept],
            "empty_label": _cat(self.empty_label)[kept].bool(),
            "ece": _cat(self.ece)[kept],
        }

    def reliability(self) -> torch.Tensor | None:
        """(3, bins + 1) reliability sums over the distinct volumes of all ranks (a collective under DDP);
        None when no volume gave bins."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            if not len(self.reliability_bins) or len(_cat(self.reliability_bins)) != len(_cat(self.volume)):
                return None
            return _cat(self.reliability_bins)[_distinct(_cat(self.volume))[1]].sum(0)

    def per_volume(self) -> dict[str, torch.Tensor]:
        """``{"volume": (N,) int64 volume_key, "group": (N,) index into groups, "dice": (N,), "hd95": (N,)
        (means over the classes), "class_dice": (N, K), "class_hd95": (N, K), "empty_label": (N,) bool}``
        over the N distinct volumes of all ranks (a collective under DDP: call it on every rank)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn):
            volumes = self._distinct_volumes()
        return volumes | {"dice": _class_mean(volumes["class_dice"]), "hd95": _class_mean(volumes["class_hd95"])}

    def compute(self) -> dict[str, torch.Tensor]:
        volumes = self._distinct_volumes()
        class_dice, class_hd95, group = volumes["class_dice"], volumes["class_hd95"], volumes["group"]
        dice, hd95 = _class_mean(class_dice), _class_mean(class_hd95)
        ece = volumes["ece"]
        results = {"dice": dice.nanmean(), "hd95": hd95.nanmean()}
        if not ece.isnan().all():
            results["ece"] = ece.nanmean()
        if len(self.class_names) > 1:
            for index, name in enumerate(self.class_names):
                results[f"dice_{name}"] = class_dice[:, index].nanmean()
                results[f"hd95_{name}"] = class_hd95[:, index].nanmean()
        for index, name in enumerate(self.groups):
            in_group = group == index
            if in_group.any():
                results[f"dice/{name}"] = dice[in_group].nanmean()
                results[f"hd95/{name}"] = hd95[in_group].nanmean()
                if "ece" in results:
                    results[f"ece/{name}"] = ece[in_group].nanmean()
        return results


def _cat(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A list state concatenated (after a DDP sync it is already one tensor)."""
    return torch.cat(state) if isinstance(state, list) else state


def _distinct(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) volume keys -> the distinct keys, sorted, and the position of each one's first entry."""
    sorted_keys, order = torch.sort(keys, stable=True)
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return sorted_keys[first], order[first]


def _class_mean(values: torch.Tensor) -> torch.Tensor:
    """(N, K) per-class values -> (N,) NaN-skipping means (NaN where a case has no value at all)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return values.nanmean(1) if values.shape[1] != 1 else values[:, 0]
