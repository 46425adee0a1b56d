"""Table statistics: collapsed runs marked (table, CSV, JSON), deltas with t intervals over paired
seeds, a once-trained row paired with every seed, per-seed dots in the site chart."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
from matplotlib.collections import PathCollection

from distill import report
from distill.plotting import site_dice_bars
from distill.runs import RunResult

COLUMNS = [{"metric": "test/dice", "label": "Dice"}]


def run(name: str, seed: int, dice: float, val: float) -> RunResult:
    return RunResult(name, seed, {"test/dice": dice}, "val/dice", val, 1000, 1.0, "best.ckpt", "log")


RESULTS = [
    run("teacher", 0, 0.70, 0.71),
    *[run("student", s, d, v) for s, (d, v) in enumerate([(0.60, 0.62), (0.40, 0.30), (0.62, 0.60)])],
    *[run("student + KD", s, d, v) for s, (d, v) in enumerate([(0.61, 0.61), (0.55, 0.52), (0.63, 0.62)])],
]


def test_a_collapsed_run_is_marked_everywhere_and_kept_in_the_mean():
    rows = report.group_rows(RESULTS)
    # student: median val 0.60; seed 1's 0.30 < 0.8 x 0.60. KD: median 0.61, 0.52 >= 0.488.
    assert report.collapsed_runs(rows) == {("student", 1): "its row's median 0.600"}
    table = report.format_table("t", COLUMNS, [], RESULTS)
    assert "| student (collapsed: seed 1) | 0.00M | 0.540 ± 0.122 | 0.600 / 0.400! / 0.620 |" in table
    assert "kept in the means: student seed 1 (val 0.300; its row's median 0.600)" in table
    rows_csv = list(csv.DictReader(io.StringIO(report.results_csv(RESULTS))))
    assert [r["collapsed"] for r in rows_csv] == ["False", "False", "True", "False", "False", "False", "False"]
    assert [r["collapsed"] for r in json.loads(report.results_json(RESULTS))] == [False] * 2 + [True] + [False] * 4
    clean = [r for r in RESULTS if r.name != "student"]
    assert "its comparison baseline's): none" in report.format_table("t", COLUMNS, [], clean)


def test_a_row_whose_every_seed_failed_is_caught_against_its_baseline():
    failed = [run("student + KD", s, 0.0, 0.0) for s in range(3)]  # agrees with itself: its median is 0
    results = [r for r in RESULTS if r.name != "student + KD"] + failed
    compare = [{"baseline": "student", "candidate": "student + KD"}]
    assert not any(name == "student + KD" for name, _ in report.collapsed_runs(report.group_rows(results)))
    collapsed = report.collapsed_runs(report.group_rows(results), compare)
    assert {key: why for key, why in collapsed.items() if key[0] == "student + KD"} == {
        ("student + KD", s): "student's median 0.600" for s in range(3)
    }
    assert [r["collapsed"] for r in json.loads(report.results_json(results, compare))][-3:] == [True] * 3
    assert "| student + KD (collapsed: seed 0, 1, 2) |" in report.format_table("t", COLUMNS, compare, results)


def test_deltas_carry_a_t_interval_over_paired_seeds():
    compare = [
        {"baseline": "student", "candidate": "student + KD"},
        {"baseline": "student", "candidate": "teacher"},
    ]
    table = report.format_table("t", COLUMNS, compare, RESULTS)
    deltas = [0.01, 0.15, 0.01]
    mean = sum(deltas) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in deltas) / 2)
    half = 4.302652729911275 * std / math.sqrt(3)  # t_{0.975, 2}
    assert report.t_interval(deltas) == pytest.approx((mean - half, mean + half))
    assert (
        f"- student + KD vs student: Dice {mean:+.3f} (95% CI {mean - half:+.3f} to {mean + half:+.3f}, "
        "not significant; 3 paired seeds;" in table
    )
    assert "per seed +0.010, +0.150, +0.010" in table
    assert report.t_interval([0.1, 0.12, 0.11])[0] > 0  # an interval clear of 0
    # the teacher (one run) against each student seed: 0.10, 0.30, 0.08
    teacher = [0.10, 0.30, 0.08]
    low, high = report.t_interval(teacher)
    assert (
        low < 0 < high
        and f"teacher vs student: Dice +0.160 (95% CI {low:+.3f} to {high:+.3f}, not significant" in table
    )
    assert "teacher trained once, against 3 seeds" in table


def test_the_site_chart_shows_every_seed_as_a_dot():
    fig = site_dice_bars(
        {"a": {"RUNMC": (0.5, 0.1), "BMC": (0.6, 0.0)}},
        per_seed={"a": {"RUNMC": [0.4, 0.5, 0.6], "BMC": [0.6]}},
    )
    dots = [c for c in fig.axes[0].collections if isinstance(c, PathCollection)]
    assert sorted(y for c in dots for _, y in c.get_offsets()) == pytest.approx([0.4, 0.5, 0.6, 0.6])
