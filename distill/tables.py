"""Reproduce a results table from experiment YAMLs: ``distill table experiments/.../tables/X.yaml``.

The spec (runs, seeds, overrides, columns, comparisons: :mod:`distill.table_spec`) is read and
checked before any run starts. Each run trains in ``<out>/<run slug>/seed_<s>/``
(:func:`distill.runs.run_experiment`) and leaves ``result.json`` there when finished; a re-started table skips finished runs with the same resolved
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
from pathlib import Path

from distill import report
from distill.errors import DataError
from distill.limit_trained import load_teachers_spec, train_limit_trained_teachers
from distill.progress import QUIET_TRAINER_OVERRIDES, TableProgress, quiet_lightning
from distill.runs import RunResult, run_experiment, slug
from distill.table_spec import TableSpec, load_table_spec
from distill.utils import folder_lock, read_extending_yaml, refuse_output_inside_inputs, unique_path, write_text_atomic


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
