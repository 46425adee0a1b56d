"""``distill profile``: size, FLOPs and measured CPU latency of candidate students, and the
adaptive choice of student size: the most accurate trained student under a latency budget.

    distill profile slim_unet:width=4 slim_unet:width=8 mobile_unet unet:width=16 --size 384
    distill profile --results runs/tables/multi_teacher/results.json --budget-ms 40 --size 384

Accuracy comes from a results table (the validation score each run's checkpoint was chosen
by, averaged over seeds; never the test score); latency is measured here, on this machine, at
the deployment size, for each run's architecture read from its checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.errors import DataError
from distill.utils import read_json, refuse_unless_memory_fits


@dataclass
class Profile:
    name: str
    parameters: int
    gflops: float
    ms: float
    val_score: float | None = None


def parse_network_spec(spec: str) -> tuple[str, dict]:
    """``"slim_unet:width=8,dropout=0.1"`` -> ``("slim_unet", {"width": 8, "dropout": 0.1})``."""
    name, _, options = spec.partition(":")
    kwargs = {}
    for option in filter(None, options.split(",")):
        key, sep, value = option.partition("=")
        if not sep:
            raise DataError(f"network spec {spec!r}: options are key=value, got {option!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return name, kwargs


def profile_network(
    name: str, net: torch.nn.Module, input_shape: tuple[int, ...], val_score: float | None = None
) -> Profile:
    from distill.benchmarking import count_flops, latency_ms
    from distill.models import count_parameters

    return Profile(
        name=name,
        parameters=count_parameters(net),
        gflops=count_flops(net, input_shape) / 1e9,
        ms=latency_ms(net, input_shape),
        val_score=val_score,
    )


def refuse_inputs_beyond_memory(input_shape: tuple[int, ...]) -> None:
    """One line, before any network is built, when a float32 input of ``input_shape`` (B, C, H, W) cannot fit in memory."""
    refuse_unless_memory_fits(
        math.prod(input_shape) * 4,
        f"--size {input_shape[-1]}: a {'x'.join(map(str, input_shape))} float32 input",
        "lower --size or --batch",
    )


def profile_specs(specs: list[str], input_shape: tuple[int, ...]) -> list[Profile]:
    from distill.models import build_segmentation_network

    refuse_inputs_beyond_memory(input_shape)
    profiles = []
    for spec in specs:
        name, kwargs = parse_network_spec(spec)
        try:
            net = build_segmentation_network(name, input_shape[1], 2, **kwargs)
        except DataError:
            raise
        except (RuntimeError, ValueError) as err:  # an impossible option value, e.g. width=-4
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise DataError(f"network spec {spec!r}: cannot build it with these options ({reason})") from None
        profiles.append(profile_network(spec, net, input_shape))
    return profiles


def profile_results(results_path: str | Path, input_shape: tuple[int, ...]) -> list[Profile]:
    """One profile per table row: its network (from its checkpoint) and mean validation score."""
    from distill.modules.checkpoints import load_network

    refuse_inputs_beyond_memory(input_shape)
    path = Path(results_path)
    runs = read_json(path, "results file", list, " (run `distill table` first)")
    rows: dict[str, list[dict]] = {}
    for index, run in enumerate(runs):
        missing = {"name", "best_checkpoint", "val_score"} - set(run if isinstance(run, dict) else ())
        if missing:
            raise DataError(f"{path}: entry {index} is not a finished run (lacks {', '.join(sorted(missing))})")
        rows.setdefault(run["name"], []).append(run)
    profiles = []
    for name, runs in rows.items():
        net = load_network(runs[0]["best_checkpoint"])
        scores = [r["val_score"] for r in runs if r.get("val_score") is not None]
        profiles.append(profile_network(name, net, input_shape, sum(scores) / len(scores) if scores else None))
    return profiles


def choose_under_budget(profiles: list[Profile], budget_ms: float) -> Profile:
    """The profile with the best validation score whose latency fits the budget."""
    fitting = [p for p in profiles if p.ms <= budget_ms and p.val_score is not None and not math.isnan(p.val_score)]
    if not fitting:
        fastest = min(profiles, key=lambda p: p.ms)
        raise DataError(
            f"--budget-ms {budget_ms}: no scored student is that fast (fastest: {fastest.name}, {fastest.ms:.1f} ms)"
        )
    return max(fitting, key=lambda p: p.val_score)


def format_profiles(profiles: list[Profile], input_shape: tuple[int, ...]) -> str:
    lines = [
        f"input {tuple(input_shape)}, {torch.get_num_threads()} CPU threads, median of 10 eval-mode passes",
        "",
        "| network | params | GFLOPs | CPU ms | val score |",
        "|---|---|---|---|---|",
    ]
    for p in profiles:
        score = "-" if p.val_score is None else f"{p.val_score:.3f}"
        lines.append(f"| {p.name} | {p.parameters / 1e6:.2f}M | {p.gflops:.2f} | {p.ms:.1f} | {score} |")
    return "\n".join(lines)
