"""Reproduce a results table from experiment YAMLs: ``distill table experiments/.../tables/X.yaml``.

A table spec lists runs (each an experiment YAML, trained then tested on its best checkpoint),
overrides applied to every run, and which runs to compare::

    title: Prostate, procedure 1
    extends: other_spec.yaml          # optional: start from another spec, then update its keys
    overrides: ["--trainer.max_epochs=3"]
    runs:
      - {name: teacher, config: experiments/prostate/teacher.yaml}
      - {name: student + KD, config: experiments/prostate/student_kd.yaml, teacher: teacher}
    compare: {baseline: student (no KD), candidate: student + KD}

``teacher: <run name>`` passes that run's best checkpoint as the teacher. Each run trains in
``<out>/<run slug>/`` (versioned sub-directories, never overwritten); the table is printed and
saved as ``<out>/results.md`` and ``results.json`` (``results-1.md`` ... if those exist).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distill.errors import DataError
from distill.utils import unique_path

RUN_KEYS = {"name", "config", "teacher", "overrides"}


@dataclass
class RunResult:
    name: str
    metrics: dict[str, float]
    parameters: int
    ms_per_slice: float
    best_checkpoint: str
    log_dir: str


@dataclass
class TableSpec:
    title: str
    runs: list[dict]
    overrides: list[str] = field(default_factory=list)
    compare: dict[str, str] | None = None


def load_table_spec(path: str | Path) -> TableSpec:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: table spec not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if "extends" in raw:
        base = load_table_spec(path.parent / raw.pop("extends"))
        raw = {**base.__dict__, **raw, "overrides": base.overrides + list(raw.get("overrides", []))}
    unknown = set(raw) - {"title", "runs", "overrides", "compare"}
    if unknown:
        raise DataError(f"{path}: unknown key(s) {sorted(unknown)} (known: title, extends, runs, overrides, compare)")
    names = set()
    for run in raw.get("runs", []):
        if set(run) - RUN_KEYS or "name" not in run or "config" not in run:
            raise DataError(f"{path}: run {run} needs 'name' and 'config' (optional: teacher, overrides)")
        if run.get("teacher") and run["teacher"] not in names:
            raise DataError(f"{path}: run {run['name']!r} uses teacher {run['teacher']!r}, which is not an earlier run")
        names.add(run["name"])
    return TableSpec(title=raw.get("title", path.stem), runs=raw.get("runs", []), overrides=list(raw.get("overrides", [])), compare=raw.get("compare"))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_experiment(config: str, overrides: list[str], root_dir: Path, name: str) -> RunResult:
    """Fit ``config`` (with ``overrides``) in ``root_dir``, test its best checkpoint, measure the network."""
    from distill.benchmarking import latency_ms
    from distill.lightning_cli import DistillCLI
    from distill.models import count_parameters
    from distill.modules.checkpoints import load_segmentation_network

    if not Path(config).is_file():
        raise DataError(f"{config}: experiment config not found")
    cli = DistillCLI(args=["--config", config, *overrides, f"--trainer.default_root_dir={root_dir}"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    best = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    if not best:
        raise DataError(f"{config}: no best checkpoint was saved; a table needs a ModelCheckpoint monitoring val/dice")
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)[0]
    net = load_segmentation_network(best)  # the deployable network alone, rebuilt from its checkpoint
    in_channels, size = cli.model.hparams.in_channels, cli.datamodule.hparams.image_size
    return RunResult(
        name=name,
        metrics={k: float(v) for k, v in metrics.items()},
        parameters=count_parameters(net),
        ms_per_slice=latency_ms(net, (1, in_channels, size, size)),
        best_checkpoint=best,
        log_dir=str(cli.trainer.log_dir),
    )


def format_table(title: str, results: list[RunResult], compare: dict[str, str] | None = None) -> str:
    """Markdown table: Dice per site and mean, HD95, parameters, CPU ms per slice."""
    sites = sorted({k.split("/")[-1] for r in results for k in r.metrics if k.startswith("test/dice/")})
    header = ["model", "params", *[f"Dice {s}" for s in sites], "Dice mean", "HD95 mm", "CPU ms/slice"]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fmt = lambda v: "-" if v is None or math.isnan(v) else f"{v:.3f}"  # noqa: E731
    for r in results:
        cells = [r.name, f"{r.parameters / 1e6:.2f}M"]
        cells += [fmt(r.metrics.get(f"test/dice/{s}")) for s in sites]
        cells += [fmt(r.metrics.get("test/dice")), f"{r.metrics.get('test/hd95', float('nan')):.2f}", f"{r.ms_per_slice:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if compare:
        by_name = {r.name: r for r in results}
        base, cand = by_name.get(compare["baseline"]), by_name.get(compare["candidate"])
        if base and cand:
            delta = cand.metrics["test/dice"] - base.metrics["test/dice"]
            lines += ["", f"{cand.name} vs {base.name}: mean Dice {delta:+.3f} ({100 * delta / max(base.metrics['test/dice'], 1e-8):+.1f}% relative)"]
    return "\n".join(lines)


def run_table(spec_path: str | Path, out_dir: str | Path, extra_overrides: list[str] | None = None) -> list[RunResult]:
    spec = load_table_spec(spec_path)
    out_dir = Path(out_dir)
    results: dict[str, RunResult] = {}
    for run in spec.runs:
        overrides = spec.overrides + list(run.get("overrides", [])) + list(extra_overrides or [])
        if run.get("teacher"):
            overrides.append(f"--model.init_args.teacher_checkpoint={results[run['teacher']].best_checkpoint}")
        print(f"\n=== {run['name']}: {run['config']} ===", flush=True)
        results[run["name"]] = run_experiment(run["config"], overrides, out_dir / slug(run["name"]), run["name"])
    table = format_table(spec.title, list(results.values()), spec.compare)
    print("\n" + table)
    out_dir.mkdir(parents=True, exist_ok=True)
    unique_path(out_dir / "results.md").write_text(table + "\n")
    unique_path(out_dir / "results.json").write_text(json.dumps([r.__dict__ for r in results.values()], indent=2))
    return list(results.values())
