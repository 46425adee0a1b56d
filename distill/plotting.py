"""Result figures for tables, notebooks and W&B (matplotlib, no display needed).

- :func:`segmentation_overlay`: contours of several masks (ground truth, teacher, student) on one slice.
- :func:`site_dice_bars`: per-site Dice of several table rows, bars with +- std error bars, a dot per seed.
- :func:`reliability_diagram`: observed foreground rate against predicted probability per bin, one line per row.
- :func:`phase_ribbons`: phase sequences of one video (ground truth and methods), one ribbon per row.
- :func:`confusion_matrix_plot`: a confusion matrix with counts and row-normalised shading.
- :func:`save_figure`: atomic write of a figure (temporary file, then ``os.replace``).

Every plot function returns a :class:`matplotlib.figure.Figure` built without pyplot: nothing is
shown, no global figure is left open, and saving renders with Agg whatever the session's backend
(a notebook displays the returned figure inline; ``wandb.Image(fig)`` logs it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

# Distinct colours for masks / methods / phases (matplotlib's tab10, then tab20's light tones).
_COLOURS = [matplotlib.colormaps["tab10"](i) for i in range(10)] + [
    matplotlib.colormaps["tab20"](2 * i + 1) for i in range(10)
]


def _colour(i: int):
    return _COLOURS[i % len(_COLOURS)]


def segmentation_overlay(
    image_slice: np.ndarray,
    masks: Mapping[str, np.ndarray],
    title: str | None = None,
    size_inches: float = 5.0,
) -> Figure:
    """Contours of each binary mask over a grey-scale slice, one colour per mask, with a legend.

    Args:
        image_slice: (H, W) intensities (any range; shown min-max scaled).
        masks: name -> (H, W) mask (non-zero = foreground), e.g. ``{"ground truth": gt,
            "teacher": t, "student": s}``; an empty mask gets a legend entry and no contour.
        title: axes title.
    """
    image_slice = np.asarray(image_slice, dtype=np.float64)
    if image_slice.ndim != 2:
        raise ValueError(f"image_slice must be (H, W), got shape {image_slice.shape}")
    fig = Figure(figsize=(size_inches, size_inches * image_slice.shape[0] / image_slice.shape[1]))
    ax = fig.add_subplot()
    ax.imshow(image_slice, cmap="gray", interpolation="nearest")
    handles = []
    for i, (name, mask) in enumerate(masks.items()):
        mask = np.asarray(mask) != 0
        if mask.shape != image_slice.shape:
            raise ValueError(f"mask {name!r} has shape {mask.shape}, the slice {image_slice.shape}")
        if mask.any() and not mask.all():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[_colour(i)], linewidths=1.5)
        handles.append(Line2D([], [], color=_colour(i), linewidth=1.5, label=name))
    ax.legend(handles=handles, loc="upper right", fontsize="small", framealpha=0.7)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def site_dice_bars(
    results: Mapping[str, Mapping[str, tuple[float, float]]],
    ylabel: str = "Dice",
    title: str | None = None,
    per_seed: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> Figure:
    """Grouped bars: one group per site, one bar per row (method), height = mean, error bar = std.

    Args:
        results: row name -> {site: (mean, std)}; sites are shown in first-seen order, a site
            missing from a row leaves a gap.
        per_seed: row name -> {site: values of every seed}, drawn as black dots on that row's
            bar (so a collapsed seed shows).
    """
    sites = list(dict.fromkeys(site for per_site in results.values() for site in per_site))
    if not sites:
        raise ValueError("results hold no site")
    fig = Figure(figsize=(max(4.0, 1.2 * len(sites) * max(1, len(results)) ** 0.5 + 1.5), 3.5))
    ax = fig.add_subplot()
    width = 0.8 / len(results)
    positions = np.arange(len(sites))
    for i, (row, per_site) in enumerate(results.items()):
        at = [j for j, site in enumerate(sites) if site in per_site]
        means = [per_site[sites[j]][0] for j in at]
        stds = [per_site[sites[j]][1] for j in at]
        ax.bar(
            positions[at] + (i - (len(results) - 1) / 2) * width,
            means,
            width,
            yerr=stds,
            capsize=2,
            color=_colour(i),
            label=row,
        )
        for j in at:
            values = (per_seed or {}).get(row, {}).get(sites[j], [])
            x = positions[j] + (i - (len(results) - 1) / 2) * width
            ax.scatter([x] * len(values), values, s=9, color="black", zorder=3)
    ax.set_xticks(positions, sites)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def reliability_diagram(rows: Mapping[str, np.ndarray], title: str | None = None) -> Figure:
    """Reliability diagram: per confidence bin, the observed foreground rate against the mean predicted
    probability, one line per row (marker area ~ voxels in the bin), the diagonal for perfect calibration.

    Args:
        rows: row name -> (3, bins) sums per bin: count, probability sum, foreground-label sum
            (:func:`distill.metrics.calibration.reliability_bins`); empty bins are skipped.
    """
    if not rows:
        raise ValueError("no row to draw")
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for i, (name, bins) in enumerate(rows.items()):
        count, probability, foreground = np.asarray(bins, dtype=np.float64)
        used = count > 0
        ece = np.abs(foreground - probability).sum() / count.sum()
        x, y = probability[used] / count[used], foreground[used] / count[used]
        sizes = 8 + 60 * np.sqrt(count[used] / count.sum())
        ax.plot(x, y, color=_colour(i), linewidth=1.2, label=f"{name} (pooled ECE {ece:.3f})")
        ax.scatter(x, y, s=sizes, color=_colour(i), zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted foreground probability (bin mean)")
    ax.set_ylabel("observed foreground rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def phase_ribbons(
    sequences: Mapping[str, np.ndarray],
    phase_names: Sequence[str],
    fps: float | None = None,
    title: str | None = None,
) -> Figure:
    """One horizontal colour ribbon per sequence (ground truth first, then methods), shared x axis.

    Args:
        sequences: row name -> (N,) 0-based phase indices of the same video at the same rate
            (rows may differ in length; each is drawn over its own frames).
        phase_names: (P,) names of the phase indices, for the legend.
        fps: frame rate; the x axis shows minutes when given, frames otherwise.
    """
    if not sequences:
        raise ValueError("no sequence to draw")
    n_phases = len(phase_names)
    cmap = ListedColormap([_colour(p) for p in range(n_phases)])
    norm = BoundaryNorm(np.arange(n_phases + 1) - 0.5, n_phases)
    fig = Figure(figsize=(8.0, 0.5 + 0.45 * len(sequences) + 0.25 * ((n_phases + 3) // 4)))
    axes = fig.subplots(len(sequences), 1, sharex=True, squeeze=False)[:, 0]
    scale = 1.0 / (60.0 * fps) if fps else 1.0
    for ax, (name, labels) in zip(axes, sequences.items()):
        labels = np.asarray(labels)
        if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= n_phases)):
            raise ValueError(f"sequence {name!r} must be (N,) indices in [0, {n_phases})")
        ax.imshow(
            labels[None, :],
            aspect="auto",
            cmap=cmap,
            norm=norm,
            interpolation="nearest",
            extent=(0, labels.size * scale, 0, 1),
        )
        ax.set_yticks([0.5], [name])
        ax.tick_params(axis="y", length=0)
    axes[-1].set_xlabel("time (min)" if fps else "frame")
    handles = [Patch(color=_colour(p), label=name) for p, name in enumerate(phase_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(4, n_phases), fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 * ((n_phases + 3) // 4), 1, 1))
    return fig


def confusion_matrix_plot(
    cm: np.ndarray,
    class_names: Sequence[str],
    title: str | None = None,
) -> Figure:
    """A (C, C) confusion matrix (rows: true class, columns: predicted), counts written in each
    cell, shading by the row-normalised rate (recall per true class)."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"cm must be ({len(class_names)}, {len(class_names)}), got shape {cm.shape}")
    rows = cm.sum(axis=1, keepdims=True)
    rates = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = 1.5 + 0.55 * len(class_names)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), count in np.ndenumerate(cm):
        ax.text(
            j,
            i,
            f"{count:g}",
            ha="center",
            va="center",
            fontsize="small",
            color="white" if rates[i, j] > 0.5 else "black",
        )
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix) atomically: a temporary file in the same
    folder is renamed over ``path``, so readers never see a half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            fig.savefig(stream, format=path.suffix.lstrip(".") or "png", dpi=dpi)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
