"""Reproduce a results table from experiment YAMLs: ``distill table experiments/.../tables/X.yaml``.

A table spec lists runs (each an experiment YAML, trained, its checkpoint chosen on validation
data, then tested), overrides applied to every run, the columns, and which runs to compare::

    title: Prostate, procedure 1
    extends: other_spec.yaml          # optional: start from another spec, then update its keys
    overrides: ["--trainer.max_epochs=3"]
    seeds: 3                          # runs per row (seed_everything 0..N-1); --seeds overrides
    notes: ["split: {data.init_args.split} by case", "protocol: ..."]   # optional header notes; {dotted.key}:
                                      # that value of the first run's saved config
    columns:                          # default: Dice (per site, mean, worst site, SD across sites), HD95, ECE
      - {metric: test/dice, label: Dice, groups: true}   # groups: one column per test/dice/<group>, + worst, SD
      - {metric: test/hd95, label: HD95 mm, format: .2f}
      - {metric: test/ece, label: ECE, format: .4f}      # expected calibration error, 15 bins (lower: better)
    runs:                             # config / teachers files: relative to this spec's folder
      - {name: teacher, config: ../teacher.yaml}
      - {name: teachers by site, teachers: ../teachers/by_site.yaml}
      - {name: student + KD, config: ../student_kd.yaml, teacher: teacher}
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

A run's ``config`` (and a ``teachers:`` YAML) is relative to the folder of the spec that names it
(an absolute path stays as it is), so specs work wherever the package is installed; ``extends``
is relative to that folder too.

A grid entry expands into runs: every combination of its axes (the first axis outermost), each
giving its ``runs`` templates in order, with ``{field}`` in their strings replaced by the fields of
that combination (a value that is exactly ``"{field}"`` takes the field's value as it is; a null
drops the key). An axis value is a mapping of fields, or a plain value: then the field is the
axis's own name::

      - grid:
          budget: [{budget: 100%, videos: 1.0}, {budget: 25%, videos: 0.25}]
          init: [{init: MoCo v2, pretraining: "pre-training: MoCo v2"}, {init: scratch, pretraining: null}]
        runs:
          - {name: "{init} {budget} finetune", config: ../finetune.yaml, init_from: "{pretraining}",
             predict: true, show: false, overrides: ["--data.init_args.train_videos={videos}"]}
          - {name: "{init} {budget}", config: ../tcn.yaml, features_from: "{init} {budget} finetune",
             overrides: ["--data.init_args.train_videos={videos}"]}

``init_from: <run>`` passes that run's best checkpoint as ``pretrained_checkpoint``;
``predict: true`` also runs ``predict`` with the best checkpoint after testing (the config's
prediction writer writes under the run); ``features_from: <run>`` passes that run's
``<prediction writer output_dir>/features`` as the data's ``features_dir``. A chained run's
row also shows the metrics of the runs it came from that it does not compute itself (e.g.
the pre-training's ``test/probe_acc``); ``show: false`` keeps a run out of the table and its files;
``train_once: true`` trains a run at seed 0 only and gives it to the dependents of every seed
(e.g. one teacher for all student seeds: its row then has one seed).

Each run trains in ``<out>/<run slug>/seed_<s>/`` (:func:`distill.runs.run_experiment`) and leaves
``result.json`` there when finished; a re-started table skips finished runs with the same resolved
configuration and refuses ones finished with other settings (use another ``--out``). Run names must
be distinct (also as folder names); one table at a time works in an ``--out`` (a lock). SIGTERM
stops the table at once, naming the run it interrupted (exit 143). The table (mean +- std over
seeds; deltas as mean +- std of the per-seed differences) is printed and saved as ``results.md``,
``results.csv``, ``results.json``, ``site_dice.png`` (rows with per-site metrics), ``calibration.png``
(reliability diagram of the rows whose test runs wrote calibration bins) and
``phase_ribbons_<video>.png`` (ground truth vs every row's test phase predictions, rows that write
them, e.g. the TCN; first seed, three test videos), all by :mod:`distill.report`; earlier files are
never overwritten.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill import report
from distill.errors import DataError
from distill.limit_trained import load_teachers_spec, train_limit_trained_teachers
from distill.progress import QUIET_TRAINER_OVERRIDES, TableProgress, quiet_lightning
from distill.runs import RunResult, run_experiment, slug
from distill.utils import (
    folder_lock,
    read_extending_yaml,
    read_yaml,
    refuse_output_inside_inputs,
    unique_path,
    write_text_atomic,
)

RUN_KEYS = {
    "name",
    "config",
    "teacher",
    "teacher_index",
    "teachers",
    "overrides",
    "init_from",
    "features_from",
    "train_once",
    "predict",
    "show",
}
CHAINED_KEYS = ("teacher", "teachers", "init_from", "features_from")
SPEC_KEYS = {"title", "runs", "overrides", "compare", "columns", "seeds", "notes"}
DEFAULT_COLUMNS = [
    {"metric": "test/dice", "label": "Dice", "groups": True},
    {"metric": "test/hd95", "label": "HD95 mm", "format": ".2f"},
    {"metric": "test/ece", "label": "ECE", "format": ".4f"},
]


@dataclass
class TableSpec:
    """A parsed table spec (the keys of the module docstring; ``extends`` already applied)."""

    title: str
    runs: list[dict]
    overrides: list[str] = field(default_factory=list)
    compare: list[dict] = field(default_factory=list)
    columns: list[dict] = field(default_factory=lambda: [dict(c) for c in DEFAULT_COLUMNS])
    seeds: int = 1
    notes: list[str] = field(default_factory=list)


def load_table_spec(path: str | Path, _extended_by: tuple[Path, ...] = ()) -> TableSpec:
    """Read and check a table spec; a one-line DataError naming the file and the mistake otherwise
    (also an ``extends`` chain that comes back to a spec, and two runs with one name or folder)."""
    path = Path(path)
    raw = read_yaml(path, "table spec")
    if "runs" in raw:  # grids expanded, files named relative to this spec's folder
        raw["runs"] = [resolve_run_paths(run, path.parent) for run in expand_grids(path, raw["runs"])]
    if "extends" in raw:
        base_path = path.parent / str(raw.pop("extends"))
        chain = (*_extended_by, path.resolve())
        if base_path.resolve() in chain:
            cycle = " -> ".join(p.name for p in (*chain, base_path))
            raise DataError(f"{path}: 'extends' makes a cycle ({cycle})")
        base = load_table_spec(base_path, chain)
        raw = {**asdict(base), **raw, "overrides": base.overrides + list(raw.get("overrides", []))}
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise DataError(f"{path}: unknown key(s) {sorted(unknown)} (known: extends, {', '.join(sorted(SPEC_KEYS))})")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        raise DataError(f"{path}: 'overrides' must be a list of --key=value strings, got {overrides!r}")
    if not raw.get("runs"):
        raise DataError(f"{path}: no runs ('runs' is missing or empty; is it indented under another key?)")
    names: dict[str, dict] = {}
    folders: dict[str, str] = {}
    for run in raw.get("runs", []):
        if (
            not isinstance(run, dict)
            or set(run) - RUN_KEYS
            or "name" not in run
            or not ({"config", "teachers"} & set(run))
        ):
            raise DataError(
                f"{path}: run {run} needs 'name' and 'config' (or 'teachers'); "
                f"optional: {', '.join(sorted(RUN_KEYS - {'name', 'config'}))}"
            )
        name = run["name"] = str(run["name"])
        if name in names:
            raise DataError(f"{path}: two runs are named {name!r}; each run needs its own name")
        if folders.setdefault(slug(name), name) != name:
            raise DataError(
                f"{path}: runs {folders[slug(name)]!r} and {name!r} would share the folder {slug(name)!r}; rename one"
            )
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
    return TableSpec(
        title=raw.get("title", path.stem),
        runs=raw.get("runs", []),
        overrides=list(raw.get("overrides", [])),
        compare=compare,
        columns=columns,
        seeds=seeds,
        notes=list(raw.get("notes") or []),
    )


def expand_grids(path: Path, runs) -> list:
    """``runs`` with every grid entry replaced by its runs (the module docstring); DataError naming ``path`` otherwise."""
    if not isinstance(runs, list):
        raise DataError(f"{path}: 'runs' must be a list of runs, got {runs!r}")
    expanded = []
    for entry in runs:
        if not (isinstance(entry, dict) and "grid" in entry):
            expanded.append(entry)
            continue
        axes, templates = entry["grid"], entry.get("runs")
        if set(entry) != {"grid", "runs"} or not isinstance(axes, dict) or not axes or not isinstance(templates, list):
            raise DataError(
                f"{path}: a grid entry is {{grid: {{axis: [values, ...], ...}}, runs: [run, ...]}}, got {entry}"
            )
        for axis, values in axes.items():
            if not isinstance(values, list) or not values:
                raise DataError(f"{path}: grid axis {axis!r} must be a non-empty list of values, got {values!r}")
        for combination in itertools.product(*axes.values()):
            fields: dict = {}
            for axis, value in zip(axes, combination):
                fields.update(value if isinstance(value, dict) else {axis: value})
            expanded += [_fill(path, template, fields) for template in templates]
    return expanded


def _fill(path: Path, template, fields: dict):
    """``template`` (a run, or a value in it) with its ``{field}`` placeholders replaced; a key whose
    value is exactly a placeholder of a null field is dropped."""
    if isinstance(template, dict):
        filled = {key: _fill(path, value, fields) for key, value in template.items()}
        return {key: value for key, value in filled.items() if value is not None or template[key] is None}
    if isinstance(template, list):
        return [_fill(path, value, fields) for value in template]
    if not isinstance(template, str):
        return template
    whole = re.fullmatch(r"\{(\w+)\}", template)
    if whole and whole.group(1) in fields:
        return fields[whole.group(1)]

    def field(match: re.Match) -> str:
        if match.group(1) not in fields:
            raise DataError(f"{path}: grid run {template!r} names {match.group(0)}, which is not a field of its grid")
        return str(fields[match.group(1)])

    return re.sub(r"\{(\w+)\}", field, template)


def resolve_run_paths(run, folder: Path):
    """``run`` with its ``config`` (and a ``teachers:`` YAML of a run without config) relative to ``folder``."""
    if not isinstance(run, dict):
        return run
    keys = ["config"] if "config" in run else ["teachers"]
    return {**run, **{key: os.path.normpath(folder / str(run[key])) for key in keys if isinstance(run.get(key), str)}}


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
            raise DataError(
                f"run {run['name']!r}: features_from {run['features_from']!r}, which has no 'predict: true'"
            )
        extra.append(f"--data.init_args.features_dir={Path(source.predictions) / 'features'}")
    return extra


def upstream_metrics(run: dict, seed: int, done: dict[str, dict[int, RunResult | list[RunResult]]]) -> dict[str, float]:
    """Metrics of the runs a chained run was initialised or fed from (same seed), nearest last."""
    metrics: dict[str, float] = {}
    for key in ("init_from", "features_from"):
        if run.get(key):
            metrics.update(done[run[key]][seed].metrics)
    return metrics


# Teachers of a ``by_site`` spec without a site list: one per site of the data, planned as the 6 sites
# of the prostate release (the progress display's estimate only).
PLANNED_SITES = 6


def progress_plan(spec: TableSpec, num_seeds: int, extra_overrides: list[str]) -> list[tuple[int, str]]:
    """(epochs, config file) of every run the table will start, in order, for :class:`TableProgress`:
    a ``train_once`` run's reuse trains nothing; a teachers run trains each of its teachers."""
    plan = []
    for seed in range(num_seeds):
        for run in spec.runs:
            if run.get("train_once") and seed > 0:
                plan.append((0, ""))
            elif "config" in run:
                overrides = [*spec.overrides, *run.get("overrides", []), *extra_overrides]
                plan.append((planned_epochs(run["config"], overrides), run["config"]))
            else:
                teachers = load_teachers_spec(run["teachers"])
                overrides = [
                    *spec.overrides,
                    *run.get("overrides", []),
                    *teachers.get("overrides", []),
                    *extra_overrides,
                ]
                count = len(teachers.get("sites") or teachers.get("case_lists") or []) or teachers.get("num_teachers")
                epochs = planned_epochs(teachers["config"], overrides)
                plan.append((epochs * int(count or PLANNED_SITES), teachers["config"]))
    return plan


def planned_epochs(config: str, overrides: list[str]) -> int:
    """The epochs a run of ``config`` trains: the last ``--trainer.max_epochs`` of ``overrides``, else
    the config's (Lightning's default, 1000, when it sets none)."""
    epochs = ((read_extending_yaml(config, "experiment config").get("trainer") or {}).get("max_epochs")) or 1000
    for i, arg in enumerate(overrides):
        if arg.startswith("--trainer.max_epochs="):
            epochs = arg.split("=", 1)[1]
        elif arg == "--trainer.max_epochs" and i + 1 < len(overrides):
            epochs = overrides[i + 1]
    try:
        return max(int(epochs), 0)
    except ValueError:  # not a number: the run itself refuses it in one line
        return 0


def override_values(overrides: list[str], group: str) -> dict[str, str]:
    """The ``--<group>.init_args.KEY=VALUE`` overrides as ``{KEY: VALUE}`` (the last one of a key wins)."""
    prefix = f"--{group}.init_args."
    pairs = (item[len(prefix) :].split("=", 1) for item in overrides if item.startswith(prefix) and "=" in item)
    return {key: value for key, value in pairs}


def run_table(
    spec_path: str | Path,
    out_dir: str | Path,
    extra_overrides: list[str] | None = None,
    seeds: int | None = None,
    verbose: bool = True,
) -> list[RunResult]:
    """Train and test every run of a spec over seeds; print and save the table.

    ``verbose=False``: one progress bar instead of Lightning's logs and warnings (:mod:`distill.progress`).
    ``out_dir`` is locked meanwhile: a second table on it is refused (:func:`distill.utils.folder_lock`).
    """
    spec = load_table_spec(spec_path)
    out_dir = Path(out_dir)
    refuse_output_inside_inputs(out_dir, override_values([*spec.overrides, *(extra_overrides or [])], "data"), "--out")
    with folder_lock(out_dir, "`distill table`"):
        return _run_table(spec, out_dir, extra_overrides, seeds or spec.seeds, verbose)


def _run_table(
    spec: TableSpec, out_dir: Path, extra_overrides: list[str] | None, num_seeds: int, verbose: bool
) -> list[RunResult]:
    """The body of :func:`run_table` once ``out_dir`` is locked."""
    done: dict[str, dict[int, RunResult | list[RunResult]]] = {}
    results: list[RunResult] = []
    progress = TableProgress(progress_plan(spec, num_seeds, list(extra_overrides or [])), enabled=not verbose)
    # closed also when a run fails, so that its one-line error starts on a line of its own
    with contextlib.closing(progress), contextlib.nullcontext() if verbose else quiet_lightning():
        for seed in range(num_seeds):
            for run in spec.runs:
                if run.get("train_once") and seed > 0:  # trained at seed 0, reused by every seed's dependents
                    done[run["name"]][seed] = done[run["name"]][0]
                    progress.finish_run()
                    continue
                run_dir = out_dir / slug(run["name"]) / f"seed_{seed}"
                overrides = (
                    ([] if verbose else QUIET_TRAINER_OVERRIDES) + spec.overrides + list(run.get("overrides", []))
                )
                overrides += list(extra_overrides or [])
                if verbose:
                    print(f"\n=== {run['name']} (seed {seed}) ===", flush=True)
                progress.start_run(f"{run['name']} (seed {seed})")
                callbacks = [] if verbose else [progress.callback()]
                if "config" not in run:  # limit-trained teachers: their spec's overrides before the command line's
                    quiet = [] if verbose else QUIET_TRAINER_OVERRIDES
                    teachers = train_limit_trained_teachers(
                        run["teachers"],
                        run_dir,
                        quiet + spec.overrides + list(run.get("overrides", [])),
                        seed,
                        row_prefix=run["name"],
                        final_overrides=extra_overrides,
                        callbacks=callbacks,
                    )
                    done.setdefault(run["name"], {})[seed] = teachers
                    results += teachers
                    progress.finish_run(teachers)
                    continue
                overrides += run_overrides(run, seed, done)
                result = run_experiment(
                    run["config"],
                    overrides,
                    run_dir,
                    run["name"],
                    seed,
                    bool(run.get("predict")),
                    callbacks,
                    group=slug(spec.title),
                )
                result.metrics = {**upstream_metrics(run, seed, done), **result.metrics}
                done.setdefault(run["name"], {})[seed] = result
                if run.get("show", True):
                    results.append(result)
                progress.finish_run(result)
    table = report.format_table(spec.title, spec.columns, spec.compare, results, report.fill_notes(spec.notes, results))
    print("\n" + table)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(unique_path(out_dir / "results.md"), table + "\n")
    write_text_atomic(unique_path(out_dir / "results.csv"), report.results_csv(results, spec.compare, spec.columns))
    write_text_atomic(unique_path(out_dir / "results.json"), report.results_json(results, spec.compare, spec.columns))
    report.save_site_chart(results, spec.columns[0], unique_path(out_dir / "site_dice.png"))
    report.save_calibration_chart(results, unique_path(out_dir / "calibration.png"))
    report.save_phase_ribbons(results, out_dir)
    return results
