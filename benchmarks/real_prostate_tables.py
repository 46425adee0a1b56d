"""The prostate demo tables on a real MRI tree: procedure 1 and the few-label (semi-supervised KD) rows.

    python benchmarks/real_prostate_tables.py DATA_ROOT [--out runs/real_prostate] [--seeds 5]
        [--image-size 96] [--tables single few_labels]

DATA_ROOT is a tree in the 6-site release layout (``<SITE>/CaseNN.nii.gz`` +
``<SITE>/CaseNN_segmentation.nii.gz``, any subset of the sites; masks > 0 are the gland). Each table
is the packaged demo spec run unchanged but for the data: ``demo.yaml`` (teacher trained once,
student alone, student + KD) and ``demo_few_labels.yaml`` (the student with masks of 3 or 6
training cases, alone vs + KD on every training image from the full-data teacher or from 3
limit-trained teachers that split those labelled cases), with the
per-site split of every site present, ``--seeds`` paired seeds, checkpoints chosen on validation
cases only. Each table goes to ``<out>/<table>/results.md`` (+ ``.csv``, ``.json``, per-seed values,
deltas with 95 % t intervals, collapsed runs marked); a rerun skips finished runs.

Not part of ``make test``: real data never enters the repository or the suite. Nothing here is
specific to one tree: the sites and cases are whatever DATA_ROOT holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.errors import DataError
from distill.table_spec import packaged_experiments
from distill.tables import run_table

TABLES = {"single": "demo.yaml", "few_labels": "demo_few_labels.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", type=Path, help="tree in the release layout (<SITE>/CaseNN.nii.gz + masks)")
    parser.add_argument("--out", type=Path, default=Path("runs/real_prostate"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=96, help="in-plane size the slices are resized to")
    parser.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=list(TABLES))
    args = parser.parse_args()
    if not args.data_root.is_dir():
        raise SystemExit(f"error: {args.data_root}: data root not found")
    overrides = [f"--data.init_args.data_root={args.data_root}", f"--data.init_args.image_size={args.image_size}"]
    specs = packaged_experiments() / "prostate" / "tables"
    try:
        for name in args.tables:
            run_table(specs / TABLES[name], args.out / name, overrides, seeds=args.seeds, verbose=False)
    except DataError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
