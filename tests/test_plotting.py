"""Result figures render to PNG with the expected structure (axes, bars, ribbons, cells)."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.contour import ContourSet
from matplotlib.patches import Rectangle

from distill.plotting import confusion_matrix_plot, phase_ribbons, save_figure, segmentation_overlay, site_dice_bars


def saved_png_shape(fig, tmp_path) -> tuple[int, ...]:
    path = save_figure(fig, tmp_path / "figure.png", dpi=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]  # no temporary file left
    return matplotlib.image.imread(path).shape


def disc(size: int, centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_segmentation_overlay_draws_one_contour_per_non_empty_mask(tmp_path):
    image = np.random.default_rng(0).normal(size=(32, 32))
    masks = {"ground truth": disc(32, (16, 16), 8), "teacher": disc(32, (15, 16), 7), "student": np.zeros((32, 32))}
    fig = segmentation_overlay(image, masks, title="case 0, slice 3")
    (ax,) = fig.axes
    contour_sets = [c for c in ax.collections if isinstance(c, ContourSet)]
    assert len(contour_sets) == 2  # the empty student mask draws nothing
    assert [text.get_text() for text in ax.get_legend().get_texts()] == list(masks)
    assert len(ax.images) == 1
    assert saved_png_shape(fig, tmp_path)[2] in (3, 4)
    with pytest.raises(ValueError, match="teacher"):
        segmentation_overlay(image, {"teacher": np.zeros((16, 16))})


def test_site_dice_bars_has_one_bar_per_row_and_site(tmp_path):
    results = {
        "student": {"RUNMC": (0.80, 0.05), "BMC": (0.70, 0.10), "UCL": (0.60, 0.02)},
        "student + KD": {"RUNMC": (0.85, 0.04), "BMC": (0.75, 0.08)},  # no UCL: a gap
    }
    fig = site_dice_bars(results)
    (ax,) = fig.axes
    bars = [patch for patch in ax.patches if isinstance(patch, Rectangle)]
    assert len(bars) == 5
    np.testing.assert_allclose(sorted(bar.get_height() for bar in bars), [0.6, 0.7, 0.75, 0.8, 0.85])
    assert [label.get_text() for label in ax.get_xticklabels()] == ["RUNMC", "BMC", "UCL"]
    bar_containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [len(c) for c in bar_containers] == [3, 2]  # one bar container per row ...
    assert all(c.errorbar is not None for c in bar_containers)  # ... each with its error bars
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(results)
    saved_png_shape(fig, tmp_path)


def test_phase_ribbons_has_one_row_per_sequence(tmp_path):
    gt = np.repeat(np.arange(7), 10)
    sequences = {"ground truth": gt, "TCN": np.roll(gt, 3), "TCN + KD": np.roll(gt, 1)}
    fig = phase_ribbons(sequences, [f"P{i}" for i in range(7)], fps=1.0, title="video41")
    assert len(fig.axes) == 3
    assert [ax.get_yticklabels()[0].get_text() for ax in fig.axes] == list(sequences)
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array()[0], np.roll(gt, 3))
    assert len(fig.legends[0].get_texts()) == 7
    saved_png_shape(fig, tmp_path)
    with pytest.raises(ValueError, match="TCN"):
        phase_ribbons({"TCN": np.array([0, 7])}, [f"P{i}" for i in range(7)])


def test_confusion_matrix_plot_writes_every_count(tmp_path):
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])  # the last class never occurs
    fig = confusion_matrix_plot(cm, ["a", "b", "c"])
    ax = fig.axes[0]
    assert len(fig.axes) == 2  # the matrix and its colour bar
    assert [text.get_text() for text in ax.texts] == [str(c) for c in cm.ravel()]
    np.testing.assert_allclose(ax.images[0].get_array()[1], [0.2, 0.7, 0.1])  # row-normalised
    np.testing.assert_allclose(ax.images[0].get_array()[2], [0, 0, 0])
    saved_png_shape(fig, tmp_path)


def test_save_figure_replaces_atomically(tmp_path):
    fig = confusion_matrix_plot(np.eye(2), ["a", "b"])
    target = tmp_path / "out" / "cm.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    save_figure(fig, target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in target.parent.iterdir()] == ["cm.png"]
