"""The ``distill`` command.

``distill fit|validate|test|predict --config X.yaml``  Lightning CLI over the experiment YAMLs.
``distill data ...``, ``distill evaluate-phases ...``, ``distill table ...``, ``distill demo ...``
are plain tools (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from distill.argparse_tools import ToolParser, one_line_errors
from distill.demo import DEMO_TABLES
from distill.termination import handle_stop_signals

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
TRAINING_COMMANDS = (*LIGHTNING_SUBCOMMANDS, "table", "teachers", "demo")  # may log to W&B: offline without a key


def number_type(kind: type, minimum: float, inclusive: bool = True):
    """argparse ``type=`` converter: ``kind`` values >= ``minimum`` (> with ``inclusive=False``)."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not (value >= minimum if inclusive else value > minimum) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        return value

    convert.__name__ = f"{kind.__name__} {'>=' if inclusive else '>'} {minimum}"
    return convert


positive_int, nonnegative_int = number_type(int, 1), number_type(int, 0)
positive_float = number_type(float, 0, inclusive=False)


def add_prostate_commands(data_commands: argparse._SubParsersAction) -> None:
    """``distill data synth-prostate``."""
    parser = data_commands.add_parser(
        "synth-prostate", help="write a synthetic 6-site prostate T2 MRI tree in the real layout"
    )
    parser.add_argument("--out", required=True, help="output root (site folders are created under it)")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--scale", type=positive_float, default=1.0, help="fraction of the real case counts per site")
    parser.add_argument(
        "--size", type=number_type(int, 16), default=128, help="in-plane matrix of the 384-px sites (real: 384)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace site folders that already hold files")
    parser.add_argument(
        "--layout",
        choices=["sites", "datalist", "msd", "nnunet"],
        default="sites",
        help="sites: the release tree; datalist / msd / nnunet: its zonal RUNMC and BMC cases in that layout "
        "(msd, nnunet: with a made-up second channel)",
    )

    def run(args: argparse.Namespace) -> None:
        import tempfile

        from data_modules.synth_prostate import write_layout, write_synthetic_prostate
        from distill.errors import DataError

        options = {"seed": args.seed, "scale": args.scale, "size": args.size}
        if args.layout == "sites":
            write_synthetic_prostate(args.out, overwrite=args.overwrite, **options)
            return
        out = Path(args.out)
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            raise DataError(f"{out}: already holds files; write into an empty folder (or pass --overwrite)")
        with tempfile.TemporaryDirectory() as source:
            write_layout(write_synthetic_prostate(source, **options), out, args.layout)

    parser.set_defaults(func=run)


def add_surgical_data_commands(data_commands: argparse._SubParsersAction) -> None:
    """``distill data synth-surgical``, ``distill data extract-frames``."""
    synth = data_commands.add_parser(
        "synth-surgical", help="write synthetic Cholec80 / M2CAI16 videos and annotations in the real layout"
    )
    synth.add_argument("--out", required=True, help="dataset root to write")
    synth.add_argument("--dataset", choices=["cholec80", "m2cai16"], default="cholec80")
    synth.add_argument("--num-videos", type=positive_int, default=8)
    synth.add_argument("--seed", type=nonnegative_int, default=0)
    synth.add_argument(
        "--size", type=number_type(int, 32), nargs=2, default=[128, 160], metavar=("H", "W"), help="frame size"
    )
    synth.add_argument(
        "--duration-s",
        type=positive_float,
        nargs=2,
        default=[30.0, 90.0],
        metavar=("MIN", "MAX"),
        help="video length range in seconds",
    )
    synth.add_argument("--overwrite", action="store_true", help="replace the dataset folders of an existing tree")

    def run_synth(args: argparse.Namespace) -> None:
        from data_modules.synth_surgical import write_synthetic_surgical

        write_synthetic_surgical(
            args.out,
            dataset=args.dataset,
            num_videos=args.num_videos,
            seed=args.seed,
            size=tuple(args.size),
            duration_s=tuple(args.duration_s),
            overwrite=args.overwrite,
        )

    synth.set_defaults(func=run_synth)

    extract = data_commands.add_parser(
        "extract-frames", help="decode videos to frames (black margin cut, resized), resumable, parallel"
    )
    extract.add_argument(
        "--root", required=True, help="dataset root, or any folder of .mp4 files with --dataset unlabeled"
    )
    extract.add_argument("--out", required=True, help="frames folder: <out>/<video>/<25 fps frame index>.jpg")
    extract.add_argument("--dataset", choices=["cholec80", "m2cai16", "unlabeled"], default="cholec80")
    extract.add_argument("--fps", type=int, choices=[1, 5, 25], default=1, help="frames kept per second")
    extract.add_argument(
        "--size", type=positive_int, nargs=2, default=[250, 250], metavar=("H", "W"), help="written frame size"
    )
    extract.add_argument(
        "--pattern",
        default="{video}/{frame}.jpg",
        help="frame file pattern, e.g. '{video}/{video}_{frame:06d}.png' (TeCNO)",
    )
    extract.add_argument("--workers", type=positive_int, default=2, help="videos decoded in parallel")
    extract.add_argument(
        "--frame-tolerance",
        type=nonnegative_int,
        default=0,
        help="accepted difference between decoded and annotated frame counts",
    )
    extract.add_argument(
        "--overwrite",
        action="store_true",
        help="replace video folders finished with other settings (another fps, size or pattern)",
    )

    def run_extract(args: argparse.Namespace) -> None:
        import warnings

        from data_modules.surgical_layout import extract_dataset_frames

        with warnings.catch_warnings():  # what the extraction leaves out: one line each
            warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr, flush=True)
            done = extract_dataset_frames(
                args.root,
                args.out,
                args.dataset,
                fps=args.fps,
                size=tuple(args.size),
                frame_pattern=args.pattern,
                workers=args.workers,
                frame_tolerance=args.frame_tolerance,
                overwrite=args.overwrite,
            )
        print(f"extracted {len(done)} videos to {args.out} (finished videos are skipped)")

    extract.set_defaults(func=run_extract)


def add_phase_evaluation_command(commands: argparse._SubParsersAction) -> None:
    """``distill evaluate-phases GT_DIR PRED_DIR``."""
    parser = commands.add_parser(
        "evaluate-phases",
        help="relaxed-boundary phase metrics (M2CAI/Cholec80 MATLAB protocol) of prediction files",
        description="Prediction files: same name as the ground truth (or videoXX-pred.txt / videoXX_pred.txt), "
        "'Frame<TAB>Phase' at any regular rate; their frame numbers say which 25 fps frames they predict.",
    )
    parser.add_argument("gt_dir", help="ground-truth folder (videoXX-phase.txt or [test_]workflow_video_XX.txt)")
    parser.add_argument("pred_dir", help="prediction folder")
    parser.add_argument("--dataset", choices=("cholec80", "m2cai16"), default="cholec80")
    parser.add_argument(
        "--mode",
        choices=("corrected", "published"),
        default="corrected",
        help="'published' reproduces the MATLAB script's end-of-segment indexing slip",
    )
    parser.add_argument(
        "--pred-fps", type=positive_float, default=None, help="prediction rate (default: 25 / frame step)"
    )
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file (must not exist)")

    def run(args: argparse.Namespace) -> None:
        from pathlib import Path

        from distill.errors import DataError
        from distill.metrics.phase_files import evaluate_phase_dirs

        if args.json is not None and Path(args.json).exists():
            raise DataError(f"{args.json}: already exists; refusing to overwrite")
        if args.json is not None and not Path(args.json).parent.is_dir():
            raise DataError(f"{args.json}: folder {Path(args.json).parent} does not exist; create it first")
        report = evaluate_phase_dirs(args.gt_dir, args.pred_dir, args.dataset, args.mode, args.pred_fps)
        print(report.format())
        if args.json is not None:
            report.to_json(args.json)

    parser.set_defaults(func=run)


def add_export_commands(commands: argparse._SubParsersAction) -> None:
    """``distill export CKPT`` and ``distill segment-nifti MODEL.onnx IN OUT``."""
    export = commands.add_parser(
        "export",
        help="export a segmentation student or a frame encoder / phase classifier to ONNX or TorchScript, "
        "checked against PyTorch",
        description="Rebuilds the network from the checkpoint's hyper-parameters and weights (no teacher or "
        "pre-training file needed), exports it with a dynamic batch axis, compares the saved file with PyTorch on a "
        "sample input, prints size and latency. Segmentation: image -> logits; phase classifier: ImageNet-normalised "
        "frames -> logits, features.",
    )
    export.add_argument(
        "checkpoint", help="Lightning .ckpt of a segmentation or phase-classifier model (or a run directory)"
    )
    export.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    export.add_argument("--out", required=True, help="file to write (must not exist)")
    export.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |exported - pytorch| output")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset")
    export.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="ONNX Runtime static INT8 quantisation (QDQ, per-channel weights), calibrated on the run's training "
        "slices; refused when the test Dice through onnxruntime drops by more than --max-dice-drop",
    )
    export.add_argument(
        "--calibration-slices", type=positive_int, default=64, help="training slices that calibrate INT8 activations"
    )
    export.add_argument(
        "--max-dice-drop", type=number_type(float, 0.0), default=0.01, help="largest accepted fp32 - INT8 test Dice"
    )

    def run_export(args: argparse.Namespace) -> None:
        from data_modules.prostate_run_data import prostate_run_data
        from distill.export import export_student

        report = export_student(
            args.checkpoint,
            args.out,
            args.format,
            args.tolerance,
            args.opset,
            quantize=args.quantize,
            calibration_slices=args.calibration_slices,
            max_dice_drop=args.max_dice_drop,
            run_data=prostate_run_data,
        )
        print(report.format_lines())

    export.set_defaults(func=run_export)

    # Listed for `distill --help` only: main hands the command to distill.infer_onnx's own parser.
    commands.add_parser(
        "segment-nifti", help="segment a NIfTI volume with an exported ONNX student (onnxruntime, no PyTorch)"
    )


def add_sweep_command(commands: argparse._SubParsersAction) -> None:
    """``distill sweep FILE [--count N]``: a W&B sweep file run locally, no server."""
    sweep = commands.add_parser(
        "sweep",
        help="run a W&B sweep file locally (grid, random, bayes via Optuna), resumable",
        description="Each point runs `distill fit` as a subprocess in <out>/point-NNN (CSV logger, W&B disabled); "
        "points and metrics go to <out>/sweep.csv, which a rerun resumes from; the best point is printed.",
    )
    sweep.add_argument("file", help="sweep YAML, e.g. experiments/prostate/sweeps/student_kd.yaml")
    sweep.add_argument("--out", required=True, help="sweep directory (runs and sweep.csv)")
    sweep.add_argument("--count", type=int, default=None, help="points to run now (grid: default all remaining)")
    sweep.add_argument("--seed", type=int, default=0, help="random/bayes sampler seed (keep it when resuming)")
    sweep.epilog = "Any further --key=value arguments are LightningCLI overrides for every point, e.g. --data.init_args.data_root=..."

    def run(args: argparse.Namespace) -> None:
        from distill.sweep import run_sweep

        run_sweep(args.file, args.out, args.count, args.seed, args.lightning_overrides)

    sweep.set_defaults(func=run)


def add_table_commands(commands: argparse._SubParsersAction) -> None:
    """``distill table SPEC`` (reproduce a results table), ``distill teachers SPEC`` and ``distill demo TASK``."""
    table = commands.add_parser("table", help="train, test and tabulate every run of a table spec")
    table.add_argument("spec", help="table spec YAML, e.g. experiments/prostate/tables/single_teacher.yaml")
    table.add_argument("--out", required=True, help="directory for the runs and results.md")
    table.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help="runs per row, seeds 0..N-1 (default: the spec's 'seeds', else 1)",
    )
    table.add_argument(
        "--verbose",
        action="store_true",
        help="Lightning's logs, warnings and progress bars of every run instead of one progress display",
    )
    table.epilog = (
        "Any further --key=value arguments are LightningCLI overrides for every run, e.g. --trainer.max_epochs=5"
    )

    def run_table_command(args: argparse.Namespace) -> None:
        from distill.tables import run_table

        run_table(args.spec, args.out, args.lightning_overrides, seeds=args.seeds, verbose=args.verbose)

    table.set_defaults(func=run_table_command)

    teachers = commands.add_parser("teachers", help="train limit-trained teachers from one YAML; write their manifest")
    teachers.add_argument("spec", help="teachers spec YAML, e.g. experiments/prostate/teachers/by_site.yaml")
    teachers.add_argument("--out", required=True, help="directory for the teachers and manifest.yaml")
    teachers.add_argument("--seed", type=int, default=0, help="training seed (subsets use the data seed)")
    teachers.epilog = "Any further --key=value arguments are LightningCLI overrides for every teacher"

    def run_teachers(args: argparse.Namespace) -> None:
        from distill.limit_trained import train_limit_trained_teachers

        train_limit_trained_teachers(args.spec, args.out, seed=args.seed, final_overrides=args.lightning_overrides)

    teachers.set_defaults(func=run_teachers)

    demo = commands.add_parser("demo", help="synthetic data in the real format -> teacher -> students -> table")
    demo.add_argument(
        "task",
        choices=sorted(DEMO_TABLES),
        help="prostate: procedure 1; prostate-multi: procedure 2; prostate-few-labels: both on 3 or 6 labelled "
        "cases; surgical: MoCo v2 + distillation",
    )
    demo.add_argument(
        "--out",
        default=None,
        help="output folder (default: runs/demo for prostate, runs/surgical_demo for surgical, runs/demo_<task>)",
    )
    demo.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the synthetic data")
    demo.add_argument(
        "--seeds", type=positive_int, default=None, help="training seeds per row (default: the spec's, 3)"
    )
    demo.add_argument("--verbose", action="store_true", help="Lightning's logs and warnings of every run")
    demo.epilog = (
        "Any further --key=value arguments are LightningCLI overrides for every run, e.g. --trainer.max_epochs=2"
    )

    def run_demo_command(args: argparse.Namespace) -> None:
        from distill.demo import run_demo

        run_demo(args.task, args.out, args.seed, args.seeds, args.verbose, args.lightning_overrides)

    demo.set_defaults(func=run_demo_command)


def add_profile_command(commands: argparse._SubParsersAction) -> None:
    """``distill profile``: params, FLOPs, CPU latency of students; the best one under a latency budget."""
    parser = commands.add_parser(
        "profile", help="params, FLOPs and CPU latency of student networks; pick the best under a latency budget"
    )
    parser.add_argument("networks", nargs="*", help="network specs, e.g. slim_unet:width=8 mobile_unet unet:width=16")
    parser.add_argument(
        "--results", default=None, help="a table's results.json: profile its trained runs with their validation scores"
    )
    parser.add_argument(
        "--budget-ms",
        type=positive_float,
        default=None,
        help="with --results: choose the run with the best validation score under this latency",
    )
    parser.add_argument("--size", type=positive_int, default=384, help="in-plane input size")
    parser.add_argument("--slices", type=positive_int, default=3, help="input channels (2.5D slices)")
    parser.add_argument("--batch", type=positive_int, default=1)

    def run(args: argparse.Namespace) -> None:
        from distill.errors import DataError
        from distill.profile import choose_under_budget, format_profiles, profile_results, profile_specs

        if not args.networks and not args.results:
            raise DataError("profile: name networks (e.g. slim_unet:width=8) or give --results")
        if args.budget_ms is not None and not args.results:
            raise DataError("profile: --budget-ms chooses among trained runs; give --results too")
        shape = (args.batch, args.slices, args.size, args.size)
        profiles = profile_specs(args.networks, shape) + (profile_results(args.results, shape) if args.results else [])
        print(format_profiles(profiles, shape))
        if args.budget_ms is not None:
            best = choose_under_budget(profiles, args.budget_ms)
            print(
                f"\nbest under {args.budget_ms:g} ms: {best.name} (validation {best.val_score:.3f}, {best.ms:.1f} ms)"
            )

    parser.set_defaults(func=run)


def build_tool_parser() -> argparse.ArgumentParser:
    parser = ToolParser(prog="distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = commands.add_parser("data", help="write synthetic datasets and preprocess real ones")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    add_prostate_commands(data_commands)
    add_surgical_data_commands(data_commands)
    add_phase_evaluation_command(commands)
    add_table_commands(commands)
    add_profile_command(commands)
    add_export_commands(commands)
    add_sweep_command(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stoppable = bool(argv) and argv[0] in (*TRAINING_COMMANDS, "sweep")  # SIGTERM: exit 143 saying what stopped
    with one_line_errors(), handle_stop_signals(f"distill {argv[0]}") if stoppable else contextlib.nullcontext():
        run_command(argv)


def run_command(argv: list[str]) -> None:
    """Run one ``distill`` command line (:func:`main` reports its errors)."""
    if argv and argv[0] in TRAINING_COMMANDS:
        from distill.wandb_logging import default_wandb_offline

        default_wandb_offline()
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from distill.lightning_cli import run_lightning_cli

        run_lightning_cli(argv)
        return
    if argv and argv[0] == "segment-nifti":  # torch-free, with its own parser
        from distill.infer_onnx import main as segment_nifti_main

        segment_nifti_main(argv[1:], prog="distill segment-nifti")
        return
    parser = build_tool_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command not in ("table", "teachers", "sweep", "demo"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.lightning_overrides = unknown
    if args.command != "export" and getattr(args, "out", None) is not None:  # export's --out is a file
        refuse_file_as_output_folder(Path(args.out))
    args.func(args)


def refuse_file_as_output_folder(out: Path) -> None:
    """A command's ``--out`` folder that is a file, or lies under one, is refused in one line before any work."""
    from distill.errors import DataError

    existing = next((path for path in (out, *out.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        problem = (
            "is a file, not a folder (it names the folder to write into)"
            if existing == out
            else f"lies under {existing}, which is a file"
        )
        raise DataError(f"{out}: --out {problem}; choose another path")


if __name__ == "__main__":
    main()
