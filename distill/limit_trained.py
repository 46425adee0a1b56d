"""Limit-trained teachers: K teachers from one YAML, each trained on a small subset of the cases.

``distill teachers experiments/prostate/teachers/by_site.yaml --out runs/teachers`` trains every
teacher and writes ``<out>/manifest.yaml`` (checkpoint, content hash, training subset and
validation score of each), which a multi-teacher student points at
(``model.init_args.teachers``). Spec::

    config: ../teacher.yaml   # the teacher experiment, relative to this spec's folder (or absolute)
    partition: by_site        # by_site (one teacher per site) | random (K disjoint parts) | case_lists
    sites: [RUNMC, BMC]       # by_site: which sites (default: every site with training cases)
    num_teachers: 3           # random
    case_lists: [[RUNMC/Case00, ...], ...]   # case_lists
    max_cases: 6              # cap on cases per teacher (a seeded choice)
    overrides: ["--trainer.max_epochs=20"]

Subsets are drawn from the training split only, with the data seed, so they do not change with
the training seed; each teacher's validation score is on the full validation split. With
``--data.init_args.labeled_cases=N`` among the overrides (few labels), the subsets partition
those N labelled cases, the ones a student given the same override learns its labels from.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

from distill.errors import DataError
from distill.modules.checkpoints import file_sha256
from distill.runs import RunResult, run_experiment, slug
from distill.utils import read_yaml, write_text_atomic

SPEC_KEYS = {"config", "partition", "sites", "num_teachers", "case_lists", "max_cases", "overrides"}
PARTITIONS = ("by_site", "random", "case_lists")


def load_teachers_spec(path: str | Path) -> dict:
    path = Path(path)
    spec = read_yaml(path, "teachers spec")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise DataError(f"{path}: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(SPEC_KEYS))})")
    if spec.get("partition") not in PARTITIONS:
        raise DataError(f"{path}: partition must be one of {', '.join(PARTITIONS)}, got {spec.get('partition')!r}")
    if "config" not in spec:
        raise DataError(f"{path}: needs 'config' (the teacher experiment YAML)")
    spec["config"] = os.path.normpath(path.parent / str(spec["config"]))
    for key, minimum in (("num_teachers", 2), ("max_cases", 1)):
        value = spec.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise DataError(f"{path}: {key} must be an integer >= {minimum}, got {value!r}")
    if spec["partition"] == "random" and spec.get("num_teachers") is None:
        raise DataError(f"{path}: partition random needs num_teachers >= 2")
    if spec["partition"] == "case_lists" and not spec.get("case_lists"):
        raise DataError(f"{path}: partition case_lists needs a non-empty 'case_lists'")
    for key in ("overrides", "sites"):
        if not _strings(spec.get(key) or []):
            raise DataError(f"{path}: {key} must be a list of strings, got {spec[key]!r}")
    case_lists = spec.get("case_lists") or []
    if not isinstance(case_lists, list) or not all(_strings(cases) for cases in case_lists):
        raise DataError(f"{path}: case_lists must be a list of lists of SITE/CaseXX strings, got {case_lists!r}")
    for where, names in [
        ("sites", spec.get("sites") or []),
        *((f"case_lists[{k}]", c) for k, c in enumerate(case_lists)),
    ]:
        twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
        if twice is not None:
            raise DataError(f"{path}: {where} lists {twice} twice")
    return spec


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def teacher_subsets(spec: dict, train_keys: list[str], data_seed: int, source: str) -> dict[str, list[str]]:
    """Teacher name -> its training cases ("SITE/CaseXX"), drawn from ``train_keys``."""
    rng = np.random.default_rng(data_seed)
    if spec["partition"] == "by_site":
        sites = spec.get("sites") or list(dict.fromkeys(key.split("/")[0] for key in train_keys))
        subsets = {site: [k for k in train_keys if k.split("/")[0] == site] for site in sites}
    elif spec["partition"] == "random":
        order = [train_keys[i] for i in rng.permutation(len(train_keys))]
        parts = np.array_split(np.arange(len(order)), int(spec["num_teachers"]))
        subsets = {f"part{k}": sorted(order[i] for i in part) for k, part in enumerate(parts)}
    else:
        subsets = {f"list{k}": list(cases) for k, cases in enumerate(spec["case_lists"])}
        known = set(train_keys)
        for k, cases in enumerate(spec["case_lists"]):
            unknown = [case for case in cases if case not in known]
            if unknown:
                raise DataError(
                    f"{source}: case_lists[{k}] names {', '.join(unknown[:3])}, not among the "
                    f"{len(train_keys)} labelled training cases of the split (SITE/CaseXX)"
                )
    for name, cases in subsets.items():
        if not cases:
            raise DataError(f"{source}: teacher {name!r} has no training cases after the split")
    cap = spec.get("max_cases")
    if cap is not None:
        subsets = {
            name: sorted(cases[i] for i in rng.permutation(len(cases))[: int(cap)]) for name, cases in subsets.items()
        }
    return subsets


def training_cases(config: str, overrides: list[str]) -> tuple[list[str], int]:
    """The labelled training cases of ``config``'s DataModule (its split, before any subset; a
    teacher learns from masks, so unlabelled images are left out) and its seed."""
    from distill.lightning_cli import DistillCLI

    cli = DistillCLI(args=["--config", config, *overrides], run=False)
    datamodule = cli.datamodule
    if not hasattr(datamodule, "case_splits"):
        raise DataError(f"{config}: limit-trained teachers need a DataModule with case-level splits")
    train = [case.key for case in datamodule.case_splits["train"] if getattr(case, "labeled", True)]
    return train, int(datamodule.seed)


def train_limit_trained_teachers(
    spec_path: str | Path,
    out_dir: str | Path,
    overrides: list[str] | None = None,
    seed: int = 0,
    row_prefix: str = "limit-trained teacher",
    final_overrides: list[str] | None = None,
    callbacks: list | None = None,
) -> list[RunResult]:
    """Train every teacher of a spec (finished ones are skipped) and write ``<out>/manifest.yaml``.

    Overrides apply in the order ``overrides`` (e.g. a table's), the spec's own, ``final_overrides``
    (e.g. the command line's). Returns one :class:`distill.runs.RunResult` per teacher, each
    carrying the manifest path.
    """
    spec = load_teachers_spec(spec_path)
    out_dir = Path(out_dir)
    overrides = list(overrides or []) + list(spec.get("overrides", [])) + list(final_overrides or [])
    keys, data_seed = training_cases(spec["config"], overrides)
    subsets = teacher_subsets(spec, keys, data_seed, str(spec_path))
    manifest_path = out_dir / "manifest.yaml"
    results, entries = [], []
    for name, cases in subsets.items():
        # every case of a subset is labelled: labeled_cases chose them, and has nothing left to drop
        subset_args = [f"--data.init_args.train_cases=[{','.join(cases)}]", "--data.init_args.labeled_cases=null"]
        result = run_experiment(
            spec["config"],
            overrides + subset_args,
            out_dir / slug(name),
            f"{row_prefix}: {name}",
            seed,
            callbacks=callbacks,
        )
        result.manifest = str(manifest_path)
        results.append(result)
        checkpoint = Path(result.best_checkpoint)
        entries.append(
            {
                "name": name,
                "checkpoint": str(checkpoint.resolve().relative_to(out_dir.resolve())),
                "sha256": file_sha256(checkpoint),
                "subset": {"train_cases": cases},
                "val_metric": result.val_score,
                "monitor": result.monitor,
            }
        )
    write_text_atomic(manifest_path, yaml.safe_dump({"teachers": entries}, sort_keys=False))
    print(f"wrote {manifest_path} ({len(entries)} teachers)", flush=True)
    return results
