"""A results table's statistics and files: mean ± std over seeds, paired deltas, the Markdown
table, CSV, JSON and figures (per-site bar chart, phase ribbons) of a list of :class:`RunResult`.

Rows are run names; each row holds one :class:`RunResult` per seed. Standard deviations are
sample ones (N-1); a delta is the mean of the per-seed differences candidate - baseline with its
95 % confidence interval (Student t, N-1 degrees of freedom), "not significant" where the
interval holds 0. A run whose validation score is below :data:`COLLAPSE_FRACTION` x its row's
median (rows of 3 or more seeds) or its comparison baseline's median is *collapsed*: marked in the table, the CSV and the JSON, and
kept in the means (never dropped, never averaged in silence).

A column with per-group values (``groups: true``, e.g. Dice per site) also shows, per row, its
worst group (the lowest value of each run; ``worst: max`` in the column for a lower-is-better metric)
and the standard deviation across groups (N-1), each a mean ± std over seeds, in the Markdown, CSV
(``<metric>_worst``, ``<metric>_worst_site``, ``<metric>_site_sd``) and JSON (``site_summary``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from scipy import stats

from distill.runs import RunResult, run_config
from distill.utils import unique_path

#: Metrics that mark a row when any of its seeds logs 1, and what the mark says under the table.
ROW_FLAGS = {
    "test/teacher_at_chance": (
        "teacher at chance",
        "its teacher checkpoint's InfoNCE is above 0.9 ln(1 + K): the teacher's similarities carry "
        "(almost) nothing to distil, so the row does not measure the method",
    ),
}
#: A run is collapsed when its validation score is below this fraction of its row's median.
COLLAPSE_FRACTION = 0.8


# ------------------------------------------------------------------ statistics
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (N-1; NaN for one value), ignoring NaNs."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def format_mean_std(values: list[float], fmt: str = ".3f") -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:{fmt}}" if math.isnan(std) else f"{mean:{fmt}} ± {std:{fmt}}"


def group_rows(results: list[RunResult]) -> dict[str, list[RunResult]]:
    rows: dict[str, list[RunResult]] = {}
    for result in results:
        rows.setdefault(result.name, []).append(result)
    return rows


def metric_columns(columns: list[dict], results: list[RunResult]) -> list[tuple[str, str, str]]:
    """(metric key, header, format) per table column, expanding ``groups`` into per-group columns."""
    expanded = []
    for column in columns:
        key, label, fmt = column["metric"], column.get("label", column["metric"]), column.get("format", ".3f")
        if column.get("groups"):
            groups = sorted({k[len(key) + 1 :] for r in results for k in r.metrics if k.startswith(key + "/")})
            expanded += [(f"{key}/{g}", f"{label} {g}", fmt) for g in groups]
        expanded.append((key, f"{label} mean" if column.get("groups") else label, fmt))
        if column.get("groups"):
            expanded += [(f"{key}_worst", f"{label} worst site", fmt), (f"{key}_site_sd", f"{label} site SD", fmt)]
    return expanded


def site_summary(metrics: dict[str, float], key: str, worst: str = "min") -> tuple[str, float, float] | None:
    """(worst group, its value, sample std across groups (N-1; NaN for one group)) of one run's
    ``<key>/<group>`` metrics; ``worst``: "min" (higher is better) or "max"; None without group values."""
    values = {k[len(key) + 1 :]: v for k, v in metrics.items() if k.startswith(key + "/") and not math.isnan(v)}
    if not values:
        return None
    chosen = (min if worst == "min" else max)(values, key=values.get)
    return chosen, values[chosen], mean_std(list(values.values()))[1]


def with_site_summaries(results: list[RunResult], columns: list[dict]) -> list[RunResult]:
    """``results`` with ``<metric>_worst`` and ``<metric>_site_sd`` added to the metrics of each run, for
    every grouped column (:func:`site_summary`); the originals are left as they are."""
    grouped = [(c["metric"], c.get("worst", "min")) for c in columns if c.get("groups")]
    summarised = []
    for result in results:
        extra = {}
        for key, worst in grouped:
            summary = site_summary(result.metrics, key, worst)
            if summary is not None:
                extra |= {f"{key}_worst": summary[1], f"{key}_site_sd": summary[2]}
        summarised.append(replace(result, metrics={**result.metrics, **extra}) if extra else result)
    return summarised


def worst_site_names(runs: list[RunResult], column: dict) -> str:
    """ " (BIDMC)", or " (BIDMC 2, HK 1)" when the seeds' worst groups differ; "" without groups."""
    sites = [s[0] for r in runs if (s := site_summary(r.metrics, column["metric"], column.get("worst", "min")))]
    counts = {site: sites.count(site) for site in dict.fromkeys(sites)}
    if len(counts) <= 1:
        return f" ({sites[0]})" if sites else ""
    return " (" + ", ".join(f"{site} {n}" for site, n in sorted(counts.items(), key=lambda x: -x[1])) + ")"


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided ``level`` confidence interval of the mean (Student t, N-1 dof); NaNs for N < 2."""
    mean, std = mean_std(values)
    count = sum(1 for v in values if not math.isnan(v))
    if count < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, count - 1) * std / math.sqrt(count)
    return mean - half, mean + half


def _scores(runs: list[RunResult]) -> list[float]:
    return [r.val_score for r in runs if r.val_score is not None and not math.isnan(r.val_score)]


def collapsed_runs(
    rows: dict[str, list[RunResult]], compare: list[dict] = (), fraction: float = COLLAPSE_FRACTION
) -> dict[tuple[str, int], str]:
    """``{(row, seed): why}`` of the collapsed runs (validation scores where higher is better).

    A run is collapsed when its validation score is below ``fraction`` x the median of its row
    (rows with 3 or more scored seeds), or, for a ``compare`` candidate, below ``fraction`` x the
    median of its baseline row (so a row whose every seed failed is caught too); compare entries
    naming a ``metric`` (e.g. a student's ECE against its teacher's) set no such floor.
    """
    references: dict[str, list[tuple[float, str]]] = {}
    for name, runs in rows.items():
        if len(_scores(runs)) >= 3:
            median = statistics.median(_scores(runs))
            references.setdefault(name, []).append((median, f"its row's median {median:.3f}"))
    for entry in compare:
        baseline = rows.get(entry["baseline"], [])
        if not _scores(baseline) or "metric" in entry:  # a comparison of another metric (e.g. ECE) sets no floor
            continue
        median = statistics.median(_scores(baseline))
        for candidate in [entry.get("candidate"), *entry.get("candidates", [])]:
            if candidate in rows:
                references.setdefault(candidate, []).append((median, f"{entry['baseline']}'s median {median:.3f}"))
    collapsed = {}
    for name, refs in references.items():
        if "loss" in rows[name][0].monitor:
            continue
        for run in rows[name]:
            below = list(dict.fromkeys(why for median, why in refs if run.val_score < fraction * median))
            if below:
                collapsed[name, run.seed] = ", ".join(below)
    return collapsed


def paired_delta(rows: dict[str, list[RunResult]], baseline: str, candidate: str, metric: str) -> list[float]:
    """Per-seed differences candidate - baseline of ``metric`` (seeds both rows have). A row of one
    run (trained once, e.g. the teacher) is paired with every seed of the other row."""
    base = {r.seed: r.metrics.get(metric, float("nan")) for r in rows.get(baseline, [])}
    cand = {r.seed: r.metrics.get(metric, float("nan")) for r in rows.get(candidate, [])}
    if len(base) == 1 and len(cand) > 1:
        base = dict.fromkeys(cand, next(iter(base.values())))
    if len(cand) == 1 and len(base) > 1:
        cand = dict.fromkeys(base, next(iter(cand.values())))
    return [cand[seed] - base[seed] for seed in sorted(cand) if seed in base]


def best_on_validation(rows: dict[str, list[RunResult]], names: list[str]) -> str:
    """The row with the best mean validation score (its own monitor's direction: max for Dice)."""
    scored = [(mean_std([r.val_score for r in rows[n]])[0], n) for n in names if n in rows]
    return max(scored)[1]


def comparison_lines(columns: list[dict], compare: list[dict], rows: dict[str, list[RunResult]]) -> list[str]:
    """A delta line per ``compare`` entry, on its ``metric`` (default: the first column's)."""
    labels = {c["metric"]: c.get("label", c["metric"]) for c in columns}
    formats = {c["metric"]: c.get("format", ".3f") for c in columns}
    lines = []
    for entry in compare:
        metric = entry.get("metric", columns[0]["metric"])
        label = labels[metric]
        digits = max(3, int(re.sub(r"\D", "", formats[metric]) or 3))  # a finer column (ECE) keeps its digits
        fmt = f"+.{digits}f"
        baseline = entry["baseline"]
        candidate = entry.get("candidate") or best_on_validation(rows, entry["candidates"])
        chosen = "" if "candidate" in entry else " (best of the candidates on validation)"
        deltas = paired_delta(rows, baseline, candidate, metric)
        if not deltas:
            continue
        base_mean = mean_std([r.metrics.get(metric) for r in rows[baseline]])[0]
        mean = mean_std(deltas)[0]
        low, high = t_interval(deltas)
        if math.isnan(low):
            interval = "one seed, no interval"
        else:
            verdict = "not significant" if low <= 0 <= high else "significant"
            interval = f"95% CI {low:{fmt}} to {high:{fmt}}, {verdict}"
        once = [n for n in (baseline, candidate) if len(rows[n]) == 1 and len(deltas) > 1]
        paired = f"{once[0]} trained once, against {len(deltas)} seeds" if once else f"{len(deltas)} paired seeds"
        per_seed = ", ".join(f"{d:{fmt}}" for d in deltas)
        lines.append(
            f"- {candidate}{chosen} vs {baseline}: {label} {mean:{fmt}} ({interval}; {paired}; "
            f"{100 * mean / max(abs(base_mean), 1e-8):+.1f}% relative); per seed {per_seed}"
        )
    return lines


def collapse_lines(rows: dict[str, list[RunResult]], compare: list[dict] = ()) -> list[str]:
    """The collapsed runs, each with its validation score and what it fell below."""
    collapsed = collapsed_runs(rows, compare)
    rule = f"validation score below {COLLAPSE_FRACTION} x its row's median or its comparison baseline's"
    if not collapsed:
        return [f"- collapsed runs ({rule}): none"]
    runs = {(r.name, r.seed): r for row in rows.values() for r in row}
    listed = "; ".join(
        f"{name} seed {seed} (val {runs[name, seed].val_score:.3f}; {why})" for (name, seed), why in collapsed.items()
    )
    return [f"- collapsed runs ({rule}), kept in the means: {listed}"]


# ------------------------------------------------------------------ files
def fill_notes(notes: list[str], results: list[RunResult]) -> list[str]:
    """``notes`` with each ``{dotted.key}`` (e.g. ``{data.init_args.split}``) replaced by that value
    of the first run's saved config ("?" where it has none)."""
    config = run_config(results[0]) if results and any("{" in note for note in notes) else {}

    def value(match: re.Match) -> str:
        node = config
        for key in match.group(1).split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return "?" if node is None else str(node)

    return [re.sub(r"\{([A-Za-z_][\w.]*)\}", value, note) for note in notes] + protocol_notes(results)


def protocol_notes(results: list[RunResult]) -> list[str]:
    """The evaluation protocol of phase-recognition tables, read from the first run that recorded one
    (``phase_predictions/test*/protocol.json``: temporal model, prediction rate, relaxed-boundary window,
    split); [] for other tables."""
    from distill.modules.phase import PROTOCOL_FILE, protocol_lines
    from distill.utils import read_json

    for result in sorted(results, key=lambda r: r.seed):
        found = sorted((Path(result.log_dir) / "phase_predictions").glob(f"test*/{PROTOCOL_FILE}"))
        if found:
            lines = protocol_lines(read_json(found[0], "phase evaluation protocol"))
            return [f"{what} ({result.name}, seed {result.seed}): {value}" for what, value in lines.items()] + [
                "per video: each run's accuracy SD over test videos is its 'SD over videos' column; per-video "
                "mean ± SD of every metric in its phase_predictions/test/evaluation.md"
            ]
    return []


def format_table(
    title: str,
    columns: list[dict],
    compare: list[dict],
    results: list[RunResult],
    header_notes: list[str] | None = None,
) -> str:
    """Markdown: a row per run name, mean ± std over seeds per metric, the first column's value per
    seed, parameters, latency, collapsed runs, deltas with their intervals; rows with a
    :data:`ROW_FLAGS` metric at 1 are marked, the mark explained under the table."""
    results = with_site_summaries(results, columns)
    rows = group_rows(results)
    expanded = metric_columns(columns, results)
    worst_columns = {f"{c['metric']}_worst": c for c in columns if c.get("groups")}
    seeds = sorted({r.seed for r in results})
    collapsed = collapsed_runs(rows, compare)
    first_key, first_label, first_fmt = expanded[[k for k, _, _ in expanded].index(columns[0]["metric"])]
    header = ["model", "params", *[label for _, label, _ in expanded], f"{first_label} per seed", "CPU ms/input"]
    lines = [f"### {title}", ""]
    lines += [f"- {note}" for note in header_notes or []]
    lines += [
        f"- seeds: {', '.join(map(str, seeds))} (mean ± std over seeds, std with N-1); "
        "checkpoints chosen on validation cases only",
        "",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    flagged = set()
    for name, runs in rows.items():
        flags = [key for key in ROW_FLAGS if any(r.metrics.get(key, 0.0) >= 0.5 for r in runs)]
        flagged.update(flags)
        marked = [r.seed for r in runs if (name, r.seed) in collapsed]
        label = name + "".join(f" (! {ROW_FLAGS[key][0]})" for key in flags)
        label += f" (collapsed: seed {', '.join(map(str, marked))})" if marked else ""
        cells = [label, f"{runs[0].parameters / 1e6:.2f}M"]
        cells += [
            format_mean_std([r.metrics.get(key, float("nan")) for r in runs], fmt)
            + (worst_site_names(runs, worst_columns[key]) if key in worst_columns else "")
            for key, _, fmt in expanded
        ]
        values = [f"{r.metrics[first_key]:{first_fmt}}" if first_key in r.metrics else "-" for r in runs]
        cells.append(" / ".join(v + ("!" if (name, r.seed) in collapsed else "") for v, r in zip(values, runs)))
        cells.append(format_mean_std([r.ms_per_input for r in runs], ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    if flagged:
        lines += ["", *[f"- (! {ROW_FLAGS[key][0]}): {ROW_FLAGS[key][1]}" for key in ROW_FLAGS if key in flagged]]
    lines += ["", *collapse_lines(rows, compare), *comparison_lines(columns, compare, rows)]
    return "\n".join(lines)


def results_csv(results: list[RunResult], compare: list[dict] = (), columns: list[dict] = ()) -> str:
    """One line per run and seed, every metric a column (with the worst site and spread of the grouped
    ``columns``: :func:`site_summary`), and whether the run collapsed."""
    results = with_site_summaries(results, list(columns))
    grouped = [c for c in columns if c.get("groups")]
    keys = sorted({k for r in results for k in r.metrics} | {f"{c['metric']}_worst_site" for c in grouped})
    collapsed = collapsed_runs(group_rows(results), compare)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["name", "seed", "parameters", "ms_per_input", "monitor", "val_score", "collapsed", *keys, "best_checkpoint"]
    )
    for r in results:
        writer.writerow(
            [
                r.name,
                r.seed,
                r.parameters,
                f"{r.ms_per_input:.3f}",
                r.monitor,
                r.val_score,
                (r.name, r.seed) in collapsed,
                *[r.metrics.get(k, _worst_site(r, k, grouped)) for k in keys],
                r.best_checkpoint,
            ]
        )
    return buffer.getvalue()


def _worst_site(result: RunResult, key: str, grouped: list[dict]) -> str:
    """The worst group's name for a ``<metric>_worst_site`` CSV key of a grouped column, else ""."""
    for column in grouped:
        if key == f"{column['metric']}_worst_site":
            summary = site_summary(result.metrics, column["metric"], column.get("worst", "min"))
            return summary[0] if summary else ""
    return ""


def results_json(results: list[RunResult], compare: list[dict] = (), columns: list[dict] = ()) -> str:
    """Every run and seed as written to ``result.json`` (``distill profile --results`` reads it),
    with ``collapsed`` (:func:`collapsed_runs`) and, per grouped column, ``site_summary``:
    ``{metric: {"worst_site", "worst", "site_sd"}}`` (:func:`site_summary`; the std null for one group)."""
    collapsed = collapsed_runs(group_rows(results), compare)
    grouped = [c for c in columns if c.get("groups")]
    records = []
    for r in results:
        summaries = {
            c["metric"]: dict(zip(("worst_site", "worst", "site_sd"), summary))
            for c in grouped
            if (summary := site_summary(r.metrics, c["metric"], c.get("worst", "min")))
        }
        for summary in summaries.values():
            summary["site_sd"] = None if math.isnan(summary["site_sd"]) else summary["site_sd"]
        records.append({**asdict(r), "collapsed": (r.name, r.seed) in collapsed, "site_summary": summaries})
    return json.dumps(records, indent=2)


def save_site_chart(results: list[RunResult], column: dict, path: Path) -> None:
    """Per-group bar chart (mean ± std over seeds, a dot per seed) of the first column's metric, if it has groups."""
    from distill.plotting import save_figure, site_dice_bars

    key = column["metric"]
    table: dict[str, dict[str, tuple[float, float]]] = {}
    per_seed: dict[str, dict[str, list[float]]] = {}
    for name, runs in group_rows(results).items():
        groups = sorted({k[len(key) + 1 :] for r in runs for k in r.metrics if k.startswith(key + "/")})
        if groups:
            per_seed[name] = {g: [r.metrics.get(f"{key}/{g}", float("nan")) for r in runs] for g in groups}
            summary = {g: mean_std(values) for g, values in per_seed[name].items()}
            table[name] = {g: (mean, 0.0 if math.isnan(std) else std) for g, (mean, std) in summary.items()}
    if table:
        save_figure(site_dice_bars(table, ylabel=column.get("label", key), per_seed=per_seed), path)


def save_calibration_chart(results: list[RunResult], path: Path) -> None:
    """Reliability diagram of every row whose runs wrote test reliability bins
    (:data:`~distill.metrics.calibration.CALIBRATION_FILE` in their log folder), pooled over seeds."""
    import numpy as np

    from distill.metrics.calibration import CALIBRATION_FILE
    from distill.plotting import reliability_diagram, save_figure
    from distill.utils import read_json

    rows = {}
    for name, runs in group_rows(results).items():
        files = [Path(r.log_dir) / CALIBRATION_FILE for r in runs if (Path(r.log_dir) / CALIBRATION_FILE).is_file()]
        records = [read_json(f, "calibration bins") for f in files]
        if records:
            rows[name] = sum(
                np.array([r["count"], r["probability_sum"], r["foreground_sum"]], dtype=np.float64) for r in records
            )
    if rows:
        save_figure(reliability_diagram(rows, title="test voxels, pooled over seeds"), path)


def save_phase_ribbons(results: list[RunResult], out_dir: Path, num_videos: int = 3) -> None:
    """``phase_ribbons_<video>.png``: ground truth vs the test predictions of every row that wrote
    ``phase_predictions/test/<video>-pred.txt`` (first seed; the first ``num_videos`` test videos)."""
    import numpy as np

    from distill.formats.phases import VIDEO_FPS, phase_annotation_files, phase_names, read_phase_file
    from distill.plotting import phase_ribbons, save_figure

    first_seed = min((r.seed for r in results), default=0)
    writers = [r for r in results if r.seed == first_seed and (Path(r.log_dir) / "phase_predictions" / "test").is_dir()]
    folders = {r.name: Path(r.log_dir) / "phase_predictions" / "test" for r in writers}
    if not folders:
        return
    data = run_config(writers[0])["data"]["init_args"]
    annotations = phase_annotation_files(data["data_root"], data["dataset"])
    predicted = {p.name.removesuffix("-pred.txt") for p in next(iter(folders.values())).glob("*-pred.txt")}
    for video in [v for v in annotations if v in predicted][:num_videos]:
        gt_frames, gt_labels = read_phase_file(annotations[video], data["dataset"])
        sequences = {}
        for name, folder in folders.items():
            frames, labels = read_phase_file(folder / f"{video}-pred.txt", data["dataset"])
            sequences.setdefault("ground truth", gt_labels[np.searchsorted(gt_frames, frames)])
            sequences[name] = labels
        step = int(frames[1] - frames[0]) if len(frames) > 1 else 1
        figure = phase_ribbons(sequences, phase_names(data["dataset"]), fps=VIDEO_FPS / step, title=f"{video} (test)")
        save_figure(figure, unique_path(out_dir / f"phase_ribbons_{video}.png"))
