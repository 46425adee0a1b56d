"""Reproduce a results table from experiment YAMLs: ``distill table experiments/.../tables/X.yaml``.

A table spec lists runs (each an experiment YAML, trained, its checkpoint chosen on validation
data, then tested), overrides applied to every run, the columns, and which runs to compare::

    title: Prostate, procedure 1
    extends: other_spec.yaml          # optional: start from another spec, then update its keys
    overrides: ["--trainer.max_epochs=3"]
    seeds: 3                          # runs per row (seed_everything 0..N-1); --seeds overrides
    notes: ["split: ...", "protocol: ..."]   # optional: the table's header notes (default: prostate split/protocol)
    columns:                          # default: Dice (per site and mean) and HD95
      - {metric: test/dice, label: Dice, groups: true}   # groups: one column per test/dice/<group>
      - {metric: test/hd95, label: HD95 mm, format: .2f}
    runs:
      - {name: teacher, config: experiments/prostate/teacher.yaml}
      - {name: teachers by site, teachers: experiments/prostate/teachers/by_site.yaml}
      - {name: student + KD, config: experiments/prostate/student_kd.yaml, teacher: teacher}
      - {name: student + 1 limit-trained, config: ..., teacher: teachers by site, teacher_index: 0}
      - {name: student + all limit-trained, config: ..., teachers: teachers by site}  # manifest
    compare:
      - {baseline: student (no KD), candidate: student + KD}
      - {baseline: student (no KD), candidates: [A, B, C]}   # the best on validation is chosen
      - {baseline: X, candidate: Y, metric: test/acc}         # default metric: the first column's

``teacher: <run>`` passes that run's best checkpoint (same seed) as ``teacher_checkpoint``;
``teachers: <run>`` passes a teachers run's manifest as ``teachers``. A ``teachers:`` entry
naming a YAML (not a run) trains limit-trained teachers (:mod:`distill.limit_trained`).

Chained runs (pre-training -> fine-tuning -> features -> temporal model)::

      - {name: pretrain, config: .../moco.yaml, show: false}
      - {name: finetune, config: .../finetune.yaml, init_from: pretrain, predict: true, show: false}
      - {name: MoCo v2, config: .../tcn.yaml, features_from: finetune}

``init_from: <run>`` passes that run's best checkpoint as ``pretrained_checkpoint``;
``predict: true`` also runs ``predict`` with the best checkpoint after testing (the config's
prediction writer writes under the run); ``features_from: <run>`` passes that run's
``<prediction writer output_dir>/features`` as the data's ``features_dir``. A chained run's
row also shows the metrics of the runs it came from that it does not compute itself (e.g.
the pre-training's ``test/probe_acc``); ``show: false`` keeps a run out of the table and its files;
``train_once: true`` trains a run at seed 0 only and gives it to the dependents of every seed
(e.g. one teacher for all student seeds: its row then has one seed).

Each run trains in ``<out>/<run slug>/seed_<s>/`` and leaves ``result.json`` there when
finished; a re-started table skips finished runs. The table (mean +- std over seeds; deltas
as mean +- std of the per-seed differences) is printed and saved as ``results.md``,
``results.csv``, ``results.json``, ``site_dice.png`` (rows with per-site metrics) and
``phase_ribbons_<video>.png`` (ground truth vs every row's test phase predictions, rows that write
them, e.g. the TCN; first seed, three test videos); earlier files are never overwritten.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import statistics
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from distill.errors import DataError
from distill.utils import write_text_atomic, unique_path

RUN_KEYS = {"name", "config", "teacher", "teacher_index", "teachers", "overrides", "init_from", "features_from", "train_once",
            "predict", "show"}
CHAINED_KEYS = ("teacher", "teachers", "init_from", "features_from")
SPEC_KEYS = {"title", "runs", "overrides", "compare", "columns", "seeds", "notes"}
DEFAULT_COLUMNS = [
    {"metric": "test/dice", "label": "Dice", "groups": True},
    {"metric": "test/hd95", "label": "HD95 mm", "format": ".2f"},
]


@dataclass
class RunResult:
    """One finished run (one row, one seed)."""

    name: str
    seed: int
    metrics: dict[str, float]
    monitor: str
    val_score: float
    parameters: int
    ms_per_input: float
    best_checkpoint: str
    log_dir: str
    manifest: str | None = None
    predictions: str | None = None


@dataclass
class TableSpec:
    title: str
    runs: list[dict]
    overrides: list[str] = field(default_factory=list)
    compare: list[dict] = field(default_factory=list)
    columns: list[dict] = field(default_factory=lambda: [dict(c) for c in DEFAULT_COLUMNS])
    seeds: int = 1
    notes: list[str] = field(default_factory=list)


def load_table_spec(path: str | Path) -> TableSpec:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: table spec not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if "extends" in raw:
        base = load_table_spec(path.parent / raw.pop("extends"))
        raw = {**asdict(base), **raw, "overrides": base.overrides + list(raw.get("overrides", []))}
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise DataError(f"{path}: unknown key(s) {sorted(unknown)} (known: extends, {', '.join(sorted(SPEC_KEYS))})")
    names: dict[str, dict] = {}
    for run in raw.get("runs", []):
        if set(run) - RUN_KEYS or "name" not in run or not ({"config", "teachers"} & set(run)):
            raise DataError(f"{path}: run {run} needs 'name' and 'config' (or 'teachers'); "
                            f"optional: {', '.join(sorted(RUN_KEYS - {'name', 'config'}))}")
        for key in CHAINED_KEYS:
            ref = run.get(key)
            if ref and "config" in run and ref not in names:
                raise DataError(f"{path}: run {run['name']!r} uses {key} {ref!r}, which is not an earlier run")
        names[run["name"]] = run
    compare = raw.get("compare") or []
    compare = [compare] if isinstance(compare, dict) else list(compare)
    columns = list(raw.get("columns") or DEFAULT_COLUMNS)
    for entry in compare:
        for name in [entry.get("baseline"), entry.get("candidate"), *entry.get("candidates", [])]:
            if name is not None and name not in names:
                raise DataError(f"{path}: compare names {name!r}, which is not a run")
        if "metric" in entry and entry["metric"] not in {c["metric"] for c in columns}:
            raise DataError(f"{path}: compare metric {entry['metric']!r} is not one of the columns")
    seeds = int(raw.get("seeds", 1))
    if seeds < 1:
        raise DataError(f"{path}: seeds must be >= 1, got {seeds}")
    return TableSpec(title=raw.get("title", path.stem), runs=raw.get("runs", []), overrides=list(raw.get("overrides", [])),
                     compare=compare, columns=columns, seeds=seeds,
                     notes=list(raw.get("notes") or []))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def checkpoint_callback(trainer):
    """The run's checkpoint callback that monitors a validation metric (model selection)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor:
            return callback
    return None


def run_experiment(config: str, overrides: list[str], root_dir: Path, name: str, seed: int = 0,
                   predict: bool = False, callbacks: list | None = None, group: str | None = None) -> RunResult:
    """Fit ``config`` in ``root_dir``, test the checkpoint chosen on validation data, measure the network
    (``predict``: then predict with that checkpoint, the config's prediction writer recording).
    ``callbacks`` are added to the config's (e.g. a progress display). A W&B run (if the config logs
    to W&B) is named ``<name>/seed_<seed>`` in the group ``group`` unless the config names them.

    Finished runs (``root_dir/result.json``) are read back instead of trained again.
    """
    from distill.lightning_cli import DistillCLI
    from distill.wandb_logging import finish_wandb_runs, label_wandb_runs

    done = root_dir / "result.json"
    if done.is_file():
        return RunResult(**json.loads(done.read_text()))
    if not Path(config).is_file():
        raise DataError(f"{config}: experiment config not found")
    with warnings.catch_warnings():  # the table passes ``args`` on purpose while ``sys.argv`` holds its own
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = DistillCLI(args=["--config", config, *overrides, f"--seed_everything={seed}",
                               f"--trainer.default_root_dir={root_dir}"], run=False)
    cli.trainer.callbacks.extend(callbacks or [])
    label_wandb_runs(cli.trainer, group or slug(name), f"{name}/seed_{seed}")
    try:
        return _fit_test_measure(cli, config, name, seed, predict, done)
    finally:
        finish_wandb_runs(cli.trainer)


def _fit_test_measure(cli, config: str, name: str, seed: int, predict: bool, done: Path) -> RunResult:
    """The body of :func:`run_experiment` once the run is configured."""
    from lightning.pytorch.callbacks import BasePredictionWriter

    from distill.benchmarking import latency_ms
    from distill.models import count_parameters

    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    selector = checkpoint_callback(cli.trainer)
    if selector is None or not selector.best_model_path:
        raise DataError(f"{config}: no checkpoint chosen on validation data; a table run needs a ModelCheckpoint with a monitor")
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=selector.best_model_path, verbose=False)[0]
    predictions = None
    if predict:
        cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=selector.best_model_path, return_predictions=False)
        writers = [c for c in cli.trainer.callbacks if isinstance(c, BasePredictionWriter)]
        if not writers:
            raise DataError(f"{config}: 'predict: true' needs a prediction writer callback in the config")
        predictions = str(writers[0].output_dir)
    net = cli.model.deployable_network()
    result = RunResult(
        name=name,
        seed=seed,
        metrics={k: float(v) for k, v in metrics.items()},
        monitor=selector.monitor,
        val_score=float(selector.best_model_score),
        parameters=count_parameters(net),
        ms_per_input=latency_ms(net, cli.model.example_input_shape(cli.datamodule)),
        best_checkpoint=selector.best_model_path,
        log_dir=str(cli.trainer.log_dir),
        predictions=predictions,
    )
    write_text_atomic(done, json.dumps(asdict(result), indent=2))
    return result


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
    return expanded


def paired_delta(rows: dict[str, list[RunResult]], baseline: str, candidate: str, metric: str) -> list[float]:
    """Per-seed differences candidate - baseline of ``metric`` (seeds both rows have)."""
    base = {r.seed: r.metrics.get(metric, float("nan")) for r in rows.get(baseline, [])}
    return [r.metrics.get(metric, float("nan")) - base[r.seed] for r in rows.get(candidate, []) if r.seed in base]


def best_on_validation(rows: dict[str, list[RunResult]], names: list[str]) -> str:
    """The row with the best mean validation score (its own monitor's direction: max for Dice)."""
    scored = [(mean_std([r.val_score for r in rows[n]])[0], n) for n in names if n in rows]
    return max(scored)[1]


def comparison_lines(spec: TableSpec, rows: dict[str, list[RunResult]]) -> list[str]:
    """A delta line per ``compare`` entry, on its ``metric`` (default: the first column's)."""
    labels = {c["metric"]: c.get("label", c["metric"]) for c in spec.columns}
    lines = []
    for entry in spec.compare:
        metric = entry.get("metric", spec.columns[0]["metric"])
        label = labels[metric]
        baseline = entry["baseline"]
        candidate = entry.get("candidate") or best_on_validation(rows, entry["candidates"])
        chosen = "" if "candidate" in entry else " (best of the candidates on validation)"
        deltas = paired_delta(rows, baseline, candidate, metric)
        if not deltas:
            continue
        base_mean = mean_std([r.metrics.get(metric) for r in rows[baseline]])[0]
        mean, std = mean_std(deltas)
        spread = "" if math.isnan(std) else f" ± {std:.3f}"
        lines.append(f"- {candidate}{chosen} vs {baseline}: {label} {mean:+.3f}{spread} "
                     f"({100 * mean / max(abs(base_mean), 1e-8):+.1f}% relative; {len(deltas)} paired seeds)")
    return lines


def format_table(spec: TableSpec, results: list[RunResult], header_notes: list[str] | None = None) -> str:
    """Markdown: a row per run name, mean ± std over seeds per metric, parameters, latency, deltas."""
    rows = group_rows(results)
    columns = metric_columns(spec.columns, results)
    seeds = sorted({r.seed for r in results})
    header = ["model", "params", *[label for _, label, _ in columns], "CPU ms/input"]
    lines = [f"### {spec.title}", ""]
    lines += [f"- {note}" for note in header_notes or []]
    lines += [f"- seeds: {', '.join(map(str, seeds))} (mean ± std over seeds, std with N-1); "
              "checkpoints chosen on validation cases only", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in rows.items():
        cells = [name, f"{runs[0].parameters / 1e6:.2f}M"]
        cells += [format_mean_std([r.metrics.get(key, float("nan")) for r in runs], fmt) for key, _, fmt in columns]
        cells.append(format_mean_std([r.ms_per_input for r in runs], ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    deltas = comparison_lines(spec, rows)
    if deltas:
        lines += ["", *deltas]
    return "\n".join(lines)


def results_csv(results: list[RunResult]) -> str:
    """One line per run and seed, every metric a column."""
    keys = sorted({k for r in results for k in r.metrics})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["name", "seed", "parameters", "ms_per_input", "monitor", "val_score", *keys, "best_checkpoint"])
    for r in results:
        writer.writerow([r.name, r.seed, r.parameters, f"{r.ms_per_input:.3f}", r.monitor, r.val_score,
                         *[r.metrics.get(k, "") for k in keys], r.best_checkpoint])
    return buffer.getvalue()


# --------------------------------------------------------------------- running
def run_overrides(run: dict, seed: int, done: dict[str, dict[int, RunResult | list[RunResult]]]) -> list[str]:
    """Overrides that wire a run to the teacher runs it names (same seed)."""
    extra = []
    if run.get("teacher"):
        source = done[run["teacher"]][seed]
        if isinstance(source, list):  # a teachers run: pick one limit-trained teacher
            source = source[int(run.get("teacher_index", 0))]
        extra.append(f"--model.init_args.teacher_checkpoint={source.best_checkpoint}")
    if run.get("teachers") and "config" in run:
        extra.append(f"--model.init_args.teachers={done[run['teachers']][seed][0].manifest}")
    if run.get("init_from"):
        extra.append(f"--model.init_args.pretrained_checkpoint={done[run['init_from']][seed].best_checkpoint}")
    if run.get("features_from"):
        source = done[run["features_from"]][seed]
        if source.predictions is None:
            raise DataError(f"run {run['name']!r}: features_from {run['features_from']!r}, which has no 'predict: true'")
        extra.append(f"--data.init_args.features_dir={Path(source.predictions) / 'features'}")
    return extra


def upstream_metrics(run: dict, seed: int, done: dict[str, dict[int, RunResult | list[RunResult]]]) -> dict[str, float]:
    """Metrics of the runs a chained run was initialised or fed from (same seed), nearest last."""
    metrics: dict[str, float] = {}
    for key in ("init_from", "features_from"):
        if run.get(key):
            metrics.update(done[run[key]][seed].metrics)
    return metrics


def run_table(spec_path: str | Path, out_dir: str | Path, extra_overrides: list[str] | None = None,
              seeds: int | None = None, verbose: bool = True) -> list[RunResult]:
    """Train and test every run of a spec over seeds; print and save the table.

    ``verbose=False``: one progress bar instead of Lightning's logs and warnings (:mod:`distill.progress`).
    """
    from distill.limit_trained import train_limit_trained_teachers
    from distill.progress import QUIET_TRAINER_OVERRIDES, TableProgress, quiet_lightning

    spec = load_table_spec(spec_path)
    out_dir = Path(out_dir)
    num_seeds = seeds or spec.seeds
    done: dict[str, dict[int, RunResult | list[RunResult]]] = {}
    results: list[RunResult] = []
    progress = TableProgress(num_seeds * len(spec.runs), enabled=not verbose)
    with (contextlib.nullcontext() if verbose else quiet_lightning()):
        for seed in range(num_seeds):
            for run in spec.runs:
                if run.get("train_once") and seed > 0:  # trained at seed 0, reused by every seed's dependents
                    done[run["name"]][seed] = done[run["name"]][0]
                    progress.finish_run()
                    continue
                run_dir = out_dir / slug(run["name"]) / f"seed_{seed}"
                overrides = ([] if verbose else QUIET_TRAINER_OVERRIDES) + spec.overrides + list(run.get("overrides", []))
                overrides += list(extra_overrides or [])
                if verbose:
                    print(f"\n=== {run['name']} (seed {seed}) ===", flush=True)
                progress.start_run(f"{run['name']} (seed {seed})")
                callbacks = [] if verbose else [progress.callback()]
                if "config" not in run:  # limit-trained teachers: their spec's overrides before the command line's
                    quiet = [] if verbose else QUIET_TRAINER_OVERRIDES
                    teachers = train_limit_trained_teachers(
                        run["teachers"], run_dir, quiet + spec.overrides + list(run.get("overrides", [])), seed,
                        row_prefix=run["name"], final_overrides=extra_overrides, callbacks=callbacks)
                    done.setdefault(run["name"], {})[seed] = teachers
                    results += teachers
                    progress.finish_run()
                    continue
                overrides += run_overrides(run, seed, done)
                result = run_experiment(run["config"], overrides, run_dir, run["name"], seed, bool(run.get("predict")),
                                        callbacks, group=slug(spec.title))
                result.metrics = {**upstream_metrics(run, seed, done), **result.metrics}
                done.setdefault(run["name"], {})[seed] = result
                if run.get("show", True):
                    results.append(result)
                progress.finish_run()
    progress.close()
    notes = table_notes(spec, out_dir)
    table = format_table(spec, results, notes)
    print("\n" + table)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(unique_path(out_dir / "results.md"), table + "\n")
    write_text_atomic(unique_path(out_dir / "results.csv"), results_csv(results))
    write_text_atomic(unique_path(out_dir / "results.json"), json.dumps([asdict(r) for r in results], indent=2))
    save_site_chart(results, spec.columns[0], unique_path(out_dir / "site_dice.png"))
    save_phase_ribbons(results, out_dir)
    return results


def table_notes(spec: TableSpec, out_dir: Path) -> list[str]:
    """The spec's ``notes``, else split and protocol read from the first run's saved config."""
    if spec.notes:
        return spec.notes
    configs = sorted(out_dir.rglob("config.yaml"))
    if not configs:
        return []
    data = (yaml.safe_load(configs[0].read_text()) or {}).get("data", {}).get("init_args", {})
    split = data.get("split", "?")
    detail = {"per_site": f"val {data.get('val_fraction')}, test {data.get('test_fraction')} of each site's cases",
              "leave_one_site_out": f"held-out site {data.get('held_out_site')}",
              "case_list": f"case list {data.get('case_list')}"}.get(split, "")
    return [f"split: {split} by case ({detail}), data seed {data.get('seed')}",
            "protocol: 3D metrics per test volume at the original resolution, averaged per site and overall"]


def save_site_chart(results: list[RunResult], column: dict, path: Path) -> None:
    """Per-group bar chart (mean ± std over seeds) of the first column's metric, if it has groups."""
    from distill.plotting import save_figure, site_dice_bars

    key = column["metric"]
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for name, runs in group_rows(results).items():
        groups = sorted({k[len(key) + 1 :] for r in runs for k in r.metrics if k.startswith(key + "/")})
        if groups:
            stats = {g: mean_std([r.metrics.get(f"{key}/{g}", float("nan")) for r in runs]) for g in groups}
            table[name] = {g: (mean, 0.0 if math.isnan(std) else std) for g, (mean, std) in stats.items()}
    if table:
        save_figure(site_dice_bars(table, ylabel=column.get("label", key)), path)


def save_phase_ribbons(results: list[RunResult], out_dir: Path, num_videos: int = 3) -> None:
    """``phase_ribbons_<video>.png``: ground truth vs the test predictions of every row that wrote
    ``phase_predictions/test/<video>-pred.txt`` (first seed; the first ``num_videos`` test videos)."""
    import numpy as np

    from distill.formats.phases import VIDEO_FPS, phase_annotation_files, phase_names, read_phase_file
    from distill.plotting import phase_ribbons, save_figure

    first_seed = min((r.seed for r in results), default=0)
    folders = {r.name: Path(r.log_dir) / "phase_predictions" / "test" for r in results if r.seed == first_seed}
    folders = {name: folder for name, folder in folders.items() if folder.is_dir()}
    if not folders:
        return
    data = yaml.safe_load((next(iter(folders.values())).parents[1] / "config.yaml").read_text())["data"]["init_args"]
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
