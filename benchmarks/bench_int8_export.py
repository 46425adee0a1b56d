"""INT8 vs fp32 ONNX students on this CPU: latency (one thread and all threads) and test Dice.

1. Latency at ``--size`` (default 384 px, the paper's size) of the paper's students (slim U-Net,
   widths ``--widths``): each network is exported to ONNX (fp32) and quantised as ``distill export
   --quantize int8`` does (static QDQ, per-channel INT8 weights, UINT8 activations; calibrated here on
   z-scored random slices, which sets ranges only: speed does not depend on the values). Both
   models run in the same process, in turns (one call of each per round), for one onnxruntime thread
   and for all threads; the median of each and the fp32 / INT8 ratio are printed.
2. ``--demo OUT`` (a finished ``distill demo prostate --out OUT``): every student row's checkpoint is
   exported with ``--quantize int8`` (``--max-dice-drop 1``: measured, never refused) and its fp32 and
   INT8 test Dice through onnxruntime on the run's test cases, the drop and the latency ratio printed.

    python benchmarks/bench_int8_export.py                       # latency at 384 px
    python benchmarks/bench_int8_export.py --demo /tmp/demo27    # + the demo students' Dice
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from data_modules.prostate_run_data import prostate_run_data
from distill.export import export_student, interleaved_latency_ms
from distill.models import build_segmentation_network, count_parameters
from distill.quantize import quantize_int8


def quantised_pair(width: int, size: int, folder: Path, calibration: int = 16) -> tuple[Path, Path, int]:
    """fp32 and INT8 ONNX files of a slim U-Net of ``width`` (3 slices in, 2 classes) at ``size`` px."""
    net = build_segmentation_network("slim_unet", 3, 2, width=width).eval()
    fp32, int8 = folder / f"w{width}.onnx", folder / f"w{width}.int8.onnx"
    sample = torch.randn(1, 3, size, size)
    torch.onnx.export(
        net, (sample,), str(fp32), input_names=["image"], output_names=["logits"], opset_version=17, dynamo=False
    )
    quantize_int8(fp32, int8, np.random.default_rng(0).standard_normal((calibration, 3, size, size)).astype(np.float32))
    return fp32, int8, count_parameters(net)


def session_runner(session):
    """numpy input -> the session's outputs."""
    return lambda x: session.run(None, {"image": x})


def latency_table(widths: list[int], size: int, repeats: int) -> list[str]:
    import onnxruntime

    lines = [
        f"| student | params | threads | fp32 ms | INT8 ms | fp32 / INT8 | (input 1x3x{size}x{size}, median of {repeats}) |",
        "|---|---|---|---|---|---|---|",
    ]
    x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        for width in widths:
            fp32, int8, parameters = quantised_pair(width, size, Path(folder))
            for threads in (1, 0):
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = threads
                sessions = {
                    name: onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    for name, path in (("fp32", fp32), ("int8", int8))
                }
                runs = {name: session_runner(session) for name, session in sessions.items()}
                ms = interleaved_latency_ms(runs, x, repeats)
                lines.append(
                    f"| slim U-Net w{width} | {parameters / 1e6:.2f}M | {'1' if threads else 'all'} | "
                    f"{ms['fp32']:.1f} | {ms['int8']:.1f} | {ms['fp32'] / ms['int8']:.2f}x | |"
                )
    return lines


def demo_table(demo: Path, repeats: int) -> list[str]:
    lines = [
        "| demo row (seed) | fp32 Dice | INT8 Dice | drop | fp32 ms | INT8 ms | fp32 / INT8 |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for result_file in sorted(demo.glob("student*/seed_*/result.json")):
            result = json.loads(result_file.read_text())
            out = Path(folder) / f"{result_file.parent.parent.name}_{result_file.parent.name}.onnx"
            report = export_student(
                result["best_checkpoint"],
                out,
                latency_repeats=repeats,
                quantize="int8",
                max_dice_drop=1.0,
                run_data=prostate_run_data,
            )
            q, ms = report.card["model"]["int8"], report.card["model"]["latency_ms"]
            lines.append(
                f"| {result['name']} ({result['seed']}) | {q['dice_fp32']:.4f} | {q['dice_int8']:.4f} | "
                f"{q['dice_drop']:+.4f} | {ms['fp32']:.2f} | {ms['int8']:.2f} | {ms['fp32'] / ms['int8']:.2f}x |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 4], help="slim U-Net widths (paper: 8)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--demo", type=Path, default=None, help="a finished `distill demo prostate --out` folder")
    parser.add_argument("--no-latency", action="store_true", help="only the --demo students")
    args = parser.parse_args()
    if not args.no_latency:
        print("\n".join(latency_table(args.widths, args.size, args.repeats)))
    if args.demo is not None:
        print()
        print("\n".join(demo_table(args.demo, args.repeats)))


if __name__ == "__main__":
    main()
