"""``distill demo TASK``: synthetic data in the real format, then a packaged demo table on it.

The data is written once under ``<out>/data`` and kept between runs (:func:`write_demo_data_once`);
the table (:func:`distill.tables.run_table`) trains, tests and tabulates every run in ``<out>``.
"""

from __future__ import annotations

from pathlib import Path

DEMO_PROSTATE_DATA = {"scale": 1.0, "size": 96}  # write_synthetic_prostate options of the demo
DEMO_TABLES = {  # in the packaged experiments (:func:`distill.table_spec.packaged_experiments`)
    "prostate": "prostate/tables/demo.yaml",
    "prostate-multi": "prostate/tables/demo_multi_teacher.yaml",
    "prostate-few-labels": "prostate/tables/demo_few_labels.yaml",
    "surgical": "surgical/tables/demo.yaml",
}
# write_synthetic_surgical and extract_dataset_frames options of the surgical demo (5 fps holds the 1 fps frames too)
DEMO_SURGICAL_DATA = {"num_videos": 10, "size": (96, 120), "duration_s": (20.0, 40.0)}
DEMO_SURGICAL_FRAMES = {"fps": 5, "size": (56, 56)}


def run_demo(
    task: str, out: str | None, data_seed: int, seeds: int | None, verbose: bool, overrides: list[str]
) -> None:
    """The demo ``task`` (a key of :data:`DEMO_TABLES`) in ``out`` (default: runs/demo for prostate,
    runs/surgical_demo for surgical, runs/demo_<task>), with ``overrides`` for every run."""
    if task == "surgical":
        run_surgical_demo(Path(out or "runs/surgical_demo"), data_seed, seeds, verbose, overrides)
    else:
        default = "runs/demo" if task == "prostate" else f"runs/demo_{task.replace('-', '_')}"
        run_prostate_demo(task, Path(out or default), data_seed, seeds, verbose, overrides)


def run_prostate_demo(
    task: str, out: Path, data_seed: int, seeds: int | None, verbose: bool, overrides: list[str]
) -> None:
    """Synthetic prostate data under ``out/data/prostate`` (kept between runs), then the table of ``task``."""
    from data_modules.synth_prostate import write_synthetic_prostate
    from distill.table_spec import packaged_experiments
    from distill.tables import run_table

    data_root = out / "data" / "prostate"
    write_demo_data_once(
        data_root,
        "synthetic prostate data",
        lambda folder: write_synthetic_prostate(folder, **DEMO_PROSTATE_DATA, seed=data_seed),
    )
    run_table(
        packaged_experiments() / DEMO_TABLES[task],
        out,
        [f"--data.init_args.data_root={data_root}", *overrides],
        seeds=seeds,
        verbose=verbose,
    )


def run_surgical_demo(
    out: Path, data_seed: int, seeds: int | None, verbose: bool = False, overrides: list[str] | None = None
) -> None:
    """Synthetic Cholec80 videos and their frames under ``out/data`` (kept between runs), then the
    surgical demo table in ``out`` (its YAMLs read the data from ``$SURGICAL_DEMO``), with ``overrides``
    for every run.

    Training uses one intra-op thread: the loader workers take the other core of a 2-core
    machine, and on a shared machine two spinning OpenMP threads are several times slower."""
    import os

    import torch

    from data_modules.surgical_layout import extract_dataset_frames
    from data_modules.synth_surgical import write_synthetic_surgical
    from distill.table_spec import packaged_experiments
    from distill.tables import run_table

    data = out / "data"
    write_demo_data_once(
        data / "cholec80",
        "synthetic Cholec80 videos",
        lambda folder: write_synthetic_surgical(folder, "cholec80", seed=data_seed, **DEMO_SURGICAL_DATA),
    )
    extract_dataset_frames(
        data / "cholec80", data / "frames", "cholec80", **DEMO_SURGICAL_FRAMES
    )  # skips finished videos
    os.environ["SURGICAL_DEMO"] = str(data)
    torch.set_num_threads(1)
    run_table(packaged_experiments() / DEMO_TABLES["surgical"], out, overrides, seeds=seeds, verbose=verbose)


def write_demo_data_once(folder: Path, what: str, write) -> None:
    """``write(tmp)`` into a sibling ``<folder>.partial`` renamed to ``folder`` when complete, so an
    interrupted demo never leaves a half-written dataset that a re-run would take as finished."""
    import shutil

    if folder.exists():
        return
    print(f"writing {what} to {folder}", flush=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    write(partial)
    partial.rename(folder)
