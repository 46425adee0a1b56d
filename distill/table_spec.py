"""The table spec language of ``distill table SPEC`` (run by :mod:`distill.tables`), and where the
packaged specs are (:func:`packaged_experiments`).

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
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distill.errors import DataError
from distill.runs import slug
from distill.utils import read_yaml

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
        raw = {**asdict(base), **raw, "overrides": base.overrides + list(raw.get("overrides") or [])}
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise DataError(f"{path}: unknown key(s) {sorted(unknown)} (known: extends, {', '.join(sorted(SPEC_KEYS))})")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        raise DataError(f"{path}: 'overrides' must be a list of --key=value strings, got {overrides!r}")
    if not raw.get("runs"):
        raise DataError(f"{path}: no runs ('runs' is missing or empty; is it indented under another key?)")
    names = check_runs(path, raw["runs"])
    columns = list(raw.get("columns") or DEFAULT_COLUMNS)
    check_columns(path, columns)
    compare = raw.get("compare") or []
    compare = [compare] if isinstance(compare, dict) else list(compare)
    check_compare(path, compare, columns, names)
    try:
        seeds = int(raw.get("seeds", 1))
    except (TypeError, ValueError):
        raise DataError(f"{path}: seeds must be an integer >= 1, got {raw['seeds']!r}") from None
    if seeds < 1:
        raise DataError(f"{path}: seeds must be >= 1, got {seeds}")
    return TableSpec(
        title=raw.get("title", path.stem),
        runs=raw.get("runs", []),
        overrides=list(overrides),
        compare=compare,
        columns=columns,
        seeds=seeds,
        notes=list(raw.get("notes") or []),
    )


def check_runs(path: Path, runs: list) -> dict[str, dict]:
    """``{name: run}`` of a spec's runs once checked: their keys, distinct names and folders, and
    chained runs naming earlier runs (``features_from`` one with ``predict: true``); DataError naming ``path``."""
    names: dict[str, dict] = {}
    folders: dict[str, str] = {}
    for run in runs:
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
                raise DataError(f"{path}: run {name!r} uses {key} {ref!r}, which is not an earlier run")
        source = run.get("features_from")
        if source and "config" in run and not names[source].get("predict"):
            raise DataError(f"{path}: run {name!r} uses features_from {source!r}, which has no 'predict: true'")
        names[name] = run
    return names


def check_columns(path: Path, columns: list) -> None:
    """Each column a mapping with a ``metric``, a float ``format`` and ``worst`` min or max; DataError naming ``path``."""
    for column in columns:
        if not isinstance(column, dict) or "metric" not in column:
            raise DataError(f"{path}: column {column!r} needs 'metric'; optional: format, groups, label, worst")
        try:
            format(0.0, column.get("format", ".3f"))
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: column {column['metric']!r}: format {column['format']!r} is not a number format (e.g. .3f)"
            ) from None
        if column.get("worst", "min") not in ("min", "max"):
            raise DataError(f"{path}: column {column['metric']!r}: worst must be min or max, got {column['worst']!r}")


def check_compare(path: Path, compare: list, columns: list[dict], names: dict[str, dict]) -> None:
    """Each compare entry a baseline and a candidate (or candidates) among the runs, on a column's
    metric; DataError naming ``path``."""
    for entry in compare:
        if (
            not isinstance(entry, dict)
            or "baseline" not in entry
            or not (entry.get("candidate") or entry.get("candidates"))
            or not isinstance(entry.get("candidates", []), list)
        ):
            raise DataError(
                f"{path}: compare entry {entry!r} needs 'baseline' and 'candidate' (or a list 'candidates'); "
                "optional: metric"
            )
        for name in [entry["baseline"], entry.get("candidate"), *entry.get("candidates", [])]:
            if name is not None and name not in names:
                raise DataError(f"{path}: compare names {name!r}, which is not a run")
        if "metric" in entry and entry["metric"] not in {c["metric"] for c in columns}:
            raise DataError(f"{path}: compare metric {entry['metric']!r} is not one of the columns")


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


def packaged_experiments() -> Path:
    """The experiment YAMLs and table specs installed with the package (``distill/experiments``: the
    repository's ``experiments/`` folder, linked into the package and shipped in the wheel)."""
    from importlib.resources import files

    root = files("distill") / "experiments"
    if not isinstance(root, Path) or not root.is_dir():  # e.g. imported from a zip: specs name files by path
        raise DataError(f"{root}: the packaged experiments are not a folder; reinstall the package with pip")
    return root
