"""Output-layer initialisation on real MRI: one patient to train, one to validate, one to test.

    python benchmarks/bench_prostate_prior_real.py DATA_ROOT [--out runs/prostate_prior]
        [--seeds 0 1 2] [--settings zero_weights null own_weights] [--train RUNMC/Case00]
        [--val RUNMC/Case01] [--test RUNMC/Case02] [--epochs 40] [--image-size 128] [--width 16]

Run from the repository root. DATA_ROOT is a tree in the 6-site release layout. Every run is
``distill fit --config experiments/prostate/teacher.yaml`` (a width-16 U-Net, 40 epochs, 128 px,
Dice + Lovasz, AdamW) on the case list, then ``distill test`` of its ``best.ckpt`` (chosen on the validation patient)
and of its ``last.ckpt`` (the end of the budget: shows a run that degraded after its best epoch).
Settings of the output layer (``model.init_args``):

- ``zero_weights``: ``foreground_prior=0.01``, ``foreground_prior_weight_std=0`` (the old default);
- ``retinanet``: ``foreground_prior=0.01``, ``foreground_prior_weight_std=0.01``;
- ``own_weights``: ``foreground_prior=0.01``, ``foreground_prior_weight_std=null`` (the default);
- ``null``: ``foreground_prior=null`` (the network's random output layer, bias included).

Prints one line per run and a table of test Dice per seed; a rerun skips finished runs.
Not part of ``make test``: real data never enters the repository or the suite.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "zero_weights": ["--model.init_args.foreground_prior=0.01", "--model.init_args.foreground_prior_weight_std=0"],
    "retinanet": ["--model.init_args.foreground_prior=0.01", "--model.init_args.foreground_prior_weight_std=0.01"],
    "own_weights": ["--model.init_args.foreground_prior=0.01", "--model.init_args.foreground_prior_weight_std=null"],
    "null": ["--model.init_args.foreground_prior=null"],
}
DISTILL = [sys.executable, "-m", "distill.cli"]


def test_dice(test_dir: Path) -> float | None:
    """Test Dice written by ``distill test`` under ``test_dir``; None before it ran."""
    for metrics in sorted(test_dir.glob("**/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("test/dice"):
                return float(row["test/dice"])
    return None


def run(setting: str, seed: int, args: argparse.Namespace, case_list: Path) -> tuple[float, float]:
    """Fit one (setting, seed), then test its best (on validation) and its last checkpoint;
    returns their test Dice."""
    run_dir = args.out / setting / f"seed{seed}"
    test_dirs = {"best": run_dir / "test", "last": run_dir / "test_last"}
    overrides = [
        "--config",
        "experiments/prostate/teacher.yaml",
        f"--seed_everything={seed}",
        f"--model.init_args.network_kwargs.width={args.width}",
        *SETTINGS[setting],
        f"--data.init_args.data_root={args.data_root}",
        "--data.init_args.split=case_list",
        f"--data.init_args.case_list={case_list}",
        f"--data.init_args.image_size={args.image_size}",
        "--data.init_args.num_workers=0",
        "--trainer.enable_progress_bar=false",
    ]
    checkpoints = run_dir / "lightning_logs" / "version_0" / "checkpoints"
    if not (checkpoints / "fit_complete.json").exists():
        fit = [f"--trainer.max_epochs={args.epochs}", f"--trainer.default_root_dir={run_dir}"]
        subprocess.run([*DISTILL, "fit", *overrides, *fit], check=True, stdout=subprocess.DEVNULL)
    dice = []
    for name, test_dir in test_dirs.items():
        if test_dice(test_dir) is None:
            test = [f"--ckpt_path={checkpoints / f'{name}.ckpt'}", f"--trainer.default_root_dir={test_dir}"]
            subprocess.run([*DISTILL, "test", *overrides, *test], check=True, stdout=subprocess.DEVNULL)
        dice.append(test_dice(test_dir))
        if dice[-1] is None:
            raise SystemExit(f"error: {test_dir}: distill test wrote no test/dice")
    return dice[0], dice[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", type=Path, help="tree in the release layout (<SITE>/CaseNN.nii.gz + masks)")
    parser.add_argument("--out", type=Path, default=Path("runs/prostate_prior"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--settings", nargs="+", choices=sorted(SETTINGS), default=["zero_weights", "null", "own_weights"]
    )
    parser.add_argument("--train", default="RUNMC/Case00", help="training case (SITE/CaseNN)")
    parser.add_argument("--val", default="RUNMC/Case01", help="validation case: picks best.ckpt")
    parser.add_argument("--test", default="RUNMC/Case02", help="test case")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args()
    if not args.data_root.is_dir():
        raise SystemExit(f"error: {args.data_root}: data root not found")
    args.out.mkdir(parents=True, exist_ok=True)
    case_list = args.out / "cases.yaml"
    case_list.write_text(f"train: [{args.train}]\nval: [{args.val}]\ntest: [{args.test}]\n")
    results = {}
    for setting in args.settings:
        for seed in args.seeds:
            best, last = results[setting, seed] = run(setting, seed, args, case_list)
            print(f"{setting} seed {seed}: test Dice {best:.3f} (best.ckpt), {last:.3f} (last.ckpt)", flush=True)
    print("| output layer | checkpoint | test Dice per seed | mean |\n|---|---|---|---|")
    for setting in args.settings:
        for index, checkpoint in enumerate(("best", "last")):
            values = [results[setting, seed][index] for seed in args.seeds]
            per_seed = " / ".join(f"{v:.3f}" for v in values)
            print(f"| {setting} | {checkpoint} | {per_seed} | {statistics.mean(values):.3f} |")


if __name__ == "__main__":
    main()
