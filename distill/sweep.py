"""Run a W&B sweep file locally, without a W&B server: ``distill sweep FILE [--count N]``.

The sweep file is the one ``wandb sweep`` reads (``program``, ``method``, ``metric``,
``command``, ``parameters``). Each point's command line is built with wandb's own agent code
(``create_sweep_command`` / ``create_sweep_command_args``: ``${program}``, ``${args}``, ...), so
a point runs here exactly as ``wandb agent`` would run it, plus three overrides: its own run
directory ``<out>/point-NNN``, a CSV logger there (whatever logger the command selects), and
``WANDB_MODE=disabled``. Each point runs as a subprocess of the CLI
(:func:`distill.runs.run_cli_subprocess`); its metric is the last logged value of ``metric.name``
in its ``metrics.csv``. Every point run is appended to ``<out>/sweep.csv`` with its status:
``finished`` (metric logged), ``failed`` (the command exited with an error of its own, e.g. a bad
value, or never logged the metric: kept, never rerun) or ``killed`` (a signal stopped it: killed,
or SIGTERM; see :func:`distill.runs.stopped_by_signal`), so an interrupted sweep resumes where it
stopped and reruns its killed points (the points of ``grid`` and ``random`` sweeps are a fixed
sequence; ``bayes`` retries the killed points first and replays the others into Optuna).

Methods: ``grid`` (every combination of ``values``/``value`` parameters), ``random``
(``values``, ``uniform``, ``log_uniform_values``, ``int_uniform``, ``q_uniform``, ``normal``),
``bayes`` (Optuna's TPE sampler over the same parameters; needs ``pip install optuna``).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.errors import DataError
from distill.runs import ProcessKilled, run_cli_subprocess
from distill.utils import read_yaml

METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform", "q_uniform", "normal")
CSV_FIELDS = ("point", "status", "metric", "params", "run_dir")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # wandb's Agent.DEFAULT_SWEEP_COMMAND


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file.

    Attributes:
        path: the file.
        program, method, command: as written (``command`` defaults to wandb's).
        metric_name, goal: ``metric.name`` and ``metric.goal`` ("maximize" / "minimize").
        parameters: name -> spec (``{"values": [...]}``, ``{"value": x}`` or a distribution).
    """

    path: Path
    program: str
    method: str
    metric_name: str
    goal: str
    command: list
    parameters: dict

    @classmethod
    def load(cls, path: str | Path) -> SweepSpec:
        """Read and check a sweep YAML; DataError naming the file and key otherwise."""
        path = Path(path)
        config = read_yaml(path, "sweep file")
        method = config.get("method")
        if method not in METHODS:
            raise DataError(f"{path}: method: expected one of {METHODS}, got {method!r}")
        metric = config.get("metric") or {}
        if not metric.get("name") or metric.get("goal", "minimize") not in ("maximize", "minimize"):
            raise DataError(f"{path}: metric: expected {{name: <logged key>, goal: maximize|minimize}}, got {metric!r}")
        parameters = config.get("parameters") or {}
        if not parameters:
            raise DataError(f"{path}: parameters: none given")
        for name, spec in parameters.items():
            _check_parameter(path, name, spec, method)
        return cls(
            path,
            str(config.get("program", "")),
            method,
            metric["name"],
            metric.get("goal", "minimize"),
            list(config.get("command") or DEFAULT_COMMAND),
            dict(parameters),
        )


def _check_parameter(path: Path, name: str, spec: dict, method: str) -> None:
    where = f"{path}: parameters.{name}"
    if not isinstance(spec, dict):
        raise DataError(f"{where}: expected a mapping, got {spec!r}")
    if "values" in spec or "value" in spec:
        if "values" in spec and not (isinstance(spec["values"], list) and spec["values"]):
            raise DataError(f"{where}.values: expected a non-empty list")
        return
    if method == "grid":
        raise DataError(f"{where}: grid sweeps need values or value, got {spec!r}")
    distribution = spec.get("distribution", "uniform")
    if distribution not in DISTRIBUTIONS:
        raise DataError(f"{where}.distribution: expected one of {DISTRIBUTIONS}, got {distribution!r}")
    if method == "bayes" and distribution == "normal":
        raise DataError(f"{where}: bayes sweeps here support bounded distributions only (normal has no bounds)")
    needed = ("mu", "sigma") if distribution == "normal" else ("min", "max")
    missing = [key for key in needed if key not in spec]
    if missing:
        raise DataError(f"{where}: {distribution} needs {', '.join(needed)} (missing {', '.join(missing)})")


def grid_points(spec: SweepSpec) -> Iterator[dict]:
    """Every combination of the parameters' values, in file order (the last parameter fastest)."""
    names = list(spec.parameters)
    choices = [p["values"] if "values" in p else [p["value"]] for p in spec.parameters.values()]
    for combination in itertools.product(*choices):
        yield dict(zip(names, combination))


def random_point(spec: SweepSpec, rng: np.random.Generator) -> dict:
    """One point drawn from each parameter's distribution."""
    point = {}
    for name, p in spec.parameters.items():
        if "value" in p:
            point[name] = p["value"]
        elif "values" in p:
            point[name] = p["values"][int(rng.integers(len(p["values"])))]
        else:
            distribution = p.get("distribution", "uniform")
            if distribution == "int_uniform":
                point[name] = int(rng.integers(p["min"], p["max"] + 1))
            elif distribution == "log_uniform_values":
                point[name] = float(math.exp(rng.uniform(math.log(p["min"]), math.log(p["max"]))))
            elif distribution == "normal":
                point[name] = float(rng.normal(p["mu"], p["sigma"]))
            else:
                value = float(rng.uniform(p["min"], p["max"]))
                point[name] = round(value / p["q"]) * p["q"] if distribution == "q_uniform" else value
    return point


def build_argv(spec: SweepSpec, point: dict) -> list[str]:
    """The command line ``wandb agent`` runs for ``point``, built with wandb's agent helpers."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command([str(c) for c in spec.command])
    macros = sweep_utils.create_sweep_command_args({"args": {name: {"value": v} for name, v in point.items()}})
    macros |= {"interpreter": ["python"], "program": [spec.program], "env": []}
    argv = []
    for chunk in command:  # as wandb.wandb_agent.Agent._command_run expands them
        argv += (macros.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return argv


@dataclass(frozen=True)
class SweepResult:
    """One point run: index, "finished", "failed" or "killed" (module docstring), metric (None unless
    finished), parameters, run dir."""

    point: int
    status: str
    metric: float | None
    params: dict
    run_dir: str


def read_results(csv_path: Path) -> list[SweepResult]:
    """The points recorded in ``sweep.csv`` (empty when it does not exist)."""
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as stream:
        return [
            SweepResult(
                int(row["point"]),
                row["status"],
                float(row["metric"]) if row["metric"] else None,
                json.loads(row["params"]),
                row["run_dir"],
            )
            for row in csv.DictReader(stream)
        ]


def _append_result(csv_path: Path, result: SweepResult) -> None:
    new = not csv_path.is_file()
    with open(csv_path, "a", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(
            {
                "point": result.point,
                "status": result.status,
                "metric": "" if result.metric is None else repr(result.metric),
                "params": json.dumps(result.params),
                "run_dir": result.run_dir,
            }
        )


def latest_results(results: list[SweepResult]) -> list[SweepResult]:
    """The newest record of each point, by point (a killed point that was retried has two)."""
    latest = {r.point: r for r in results}
    return [latest[point] for point in sorted(latest)]


def best_result(results: list[SweepResult], goal: str) -> SweepResult | None:
    """The finished point with the best metric for ``goal``."""
    finished = [r for r in results if r.metric is not None and not math.isnan(r.metric)]
    if not finished:
        return None
    return (max if goal == "maximize" else min)(finished, key=lambda r: r.metric)


Execute = Callable[[list[str], Path, str, Sequence[str]], "float | None"]


def run_sweep(
    path: str | Path,
    out: str | Path,
    count: int | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
    execute: Execute = run_cli_subprocess,
    log: Callable[[str], None] = print,
) -> list[SweepResult]:
    """Run the sweep file ``path`` locally into ``out``; returns each point's newest record.

    Args:
        count: points to run in this call (grid: default all remaining; random/bayes: required).
        seed: seed of the random / bayes sampler (the same seed resumes the same sequence).
        overrides: LightningCLI arguments appended to every point (e.g. the data root).
        execute: runs one point (argv, run dir, metric name, overrides) and returns the metric;
            tests swap it.
    """
    spec = SweepSpec.load(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "sweep.csv"
    results = read_results(csv_path)
    killed = [r for r in latest_results(results) if r.status == "killed"]
    done = {r.point for r in latest_results(results)} - {r.point for r in killed}
    if spec.method != "grid" and count is None:
        raise DataError(f"{spec.path}: a {spec.method} sweep needs --count")
    points = _points(spec, seed, results, killed)
    ran = 0
    for index, params in points:
        if count is not None and ran >= count:
            break
        if index in done:
            continue
        run_dir = out / f"point-{index:03d}"
        log(f"point {index}: {json.dumps(params)}")
        try:
            metric = execute(build_argv(spec, params), run_dir, spec.metric_name, overrides)
            metric = None if metric is None else float(metric)
            status, outcome = ("finished" if metric is not None else "failed"), f"{spec.metric_name} = {metric}"
        except ProcessKilled as err:
            metric, status, outcome = None, "killed", f"stopped by a signal ({err}); a rerun retries it"
        result = SweepResult(index, status, metric, params, str(run_dir))
        _append_result(csv_path, result)
        results.append(result)  # before the next proposal: bayes learns from it
        log(f"point {index}: {outcome}")
        ran += 1
    best = best_result(latest_results(results), spec.goal)
    if best is not None:
        log(f"best point {best.point} ({spec.metric_name} = {best.metric:g}, {spec.goal}): {json.dumps(best.params)}")
    return latest_results(results)


def _points(
    spec: SweepSpec, seed: int, results: list[SweepResult], killed: list[SweepResult]
) -> Iterator[tuple[int, dict]]:
    """(index, params) proposals. Grid and random: a fixed sequence (resume skips recorded
    indices but the ``killed``); bayes: the ``killed`` points again, then new indices, each
    proposal made after the previous one's result was appended to ``results``."""
    if spec.method == "grid":
        return (pair for pair in enumerate(grid_points(spec)))
    if spec.method == "random":
        rng = np.random.default_rng(seed)
        return ((index, random_point(spec, rng)) for index in itertools.count())
    return itertools.chain(((r.point, r.params) for r in killed), _bayes_points(spec, seed, results))


def _bayes_points(spec: SweepSpec, seed: int, results: list[SweepResult]) -> Iterator[tuple[int, dict]]:
    try:
        import optuna
    except ImportError:
        raise DataError(f"{spec.path}: method bayes needs Optuna (pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {name: _optuna_distribution(optuna, p) for name, p in spec.parameters.items()}
    # Seeded by the history's length: a resumed study does not redraw the first study's random starts.
    study = optuna.create_study(direction=spec.goal, sampler=optuna.samplers.TPESampler(seed=seed + len(results)))
    for result in [r for r in latest_results(results) if r.status != "killed"]:  # resume: replay what is recorded
        study.add_trial(
            optuna.trial.create_trial(
                params=result.params,
                distributions=distributions,
                value=result.metric,
                state=optuna.trial.TrialState.COMPLETE if result.metric is not None else optuna.trial.TrialState.FAIL,
            )
        )
    index = max((r.point for r in results), default=-1) + 1
    while True:
        trial = study.ask(distributions)
        yield index, dict(trial.params)
        metric = results[-1].metric
        study.tell(
            trial,
            metric,
            state=optuna.trial.TrialState.COMPLETE if metric is not None else optuna.trial.TrialState.FAIL,
        )
        index += 1


def _optuna_distribution(optuna, p: dict):
    if "value" in p:
        return optuna.distributions.CategoricalDistribution([p["value"]])
    if "values" in p:
        return optuna.distributions.CategoricalDistribution(p["values"])
    distribution = p.get("distribution", "uniform")
    if distribution == "int_uniform":
        return optuna.distributions.IntDistribution(p["min"], p["max"])
    return optuna.distributions.FloatDistribution(
        p["min"],
        p["max"],
        log=distribution == "log_uniform_values",
        step=p.get("q") if distribution == "q_uniform" else None,
    )
