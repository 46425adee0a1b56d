"""Training-step cost of single- and multi-teacher distillation, and of the teacher-output cache.

Same student (slim U-Net width 8, the paper-scale student) and batch in every configuration:
no KD; one teacher live; K = 3 and 6 teachers live as the module runs them by default (one
``vmap``-ed pass on GPU, one by one on CPU), and K = 6 forced each way for comparison; K = 6 from
the cache (teacher logits in the batch); K = 6 without folding batch norm into the teachers'
convolutions. Student and teachers in ``channels_last`` unless ``--no-channels-last``. Teachers
are of the student's size class (slim U-Net width 8) unless ``--teacher-width`` says otherwise;
``--teacher-width 64`` is the paper-scale 31M U-Net teacher. Each configuration runs in its own
subprocess, so its peak memory (CPU max RSS, or CUDA max allocated) is its own; the
configurations run in turn ``--rounds`` times and each figure is the median over the rounds
(of each round's median step), so a slow spell of the machine does not land on one row.

    python benchmarks/bench_multi_teacher.py [--size 128] [--batch 8] [--steps 10] [--rounds 3] [--device cpu] [--no-channels-last]

Targets (issue): K = 6 live <= 2x the K = 1 step; K = 6 cached <= 1.2x the no-KD step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "no KD": {"teachers": 0},
    "1 teacher live": {"teachers": 1},
    "3 teachers live": {"teachers": 3},
    "6 teachers live": {"teachers": 6},
    "6 teachers live (vmap forced)": {"teachers": 6, "batched": True},
    "6 teachers live (one by one forced)": {"teachers": 6, "batched": False},
    "6 teachers live (batch norm not folded)": {"teachers": 6, "fold": False},
    "6 teachers cached": {"teachers": 6, "cached": True},
}


def write_teachers(folder: Path, count: int, width: int) -> list[str]:
    import torch

    from distill.models import build_segmentation_network

    paths = []
    for k in range(count):
        torch.manual_seed(k)
        net = build_segmentation_network("slim_unet", 3, 2, width=width)
        path = folder / f"teacher{k}.ckpt"
        torch.save(
            {
                "state_dict": {f"net.{n}": v for n, v in net.state_dict().items()},
                "hyper_parameters": {
                    "network": "slim_unet",
                    "network_kwargs": {"width": width},
                    "in_channels": 3,
                    "num_classes": 2,
                },
            },
            path,
        )
        paths.append(str(path))
    return paths


def measure(config: dict, args: argparse.Namespace) -> dict:
    """Median training-step seconds of one configuration (run inside a fresh process)."""
    import torch

    from distill.modules import MultiTeacherDistillModule, SegmentationModule

    device = torch.device(args.device)
    student = {"network": "slim_unet", "network_kwargs": {"width": 8}, "channels_last": args.channels_last}
    with tempfile.TemporaryDirectory() as tmp:
        if config["teachers"] == 0:
            module = SegmentationModule(**student, loss_weights={"dice": 1.0, "lovasz": 1.0})
        else:
            checkpoints = write_teachers(Path(tmp), config["teachers"], args.teacher_width)
            module = MultiTeacherDistillModule(
                teachers=checkpoints,
                **student,
                batched_teachers=config.get("batched"),
                loss_weights={"dice": 1.0, "lovasz": 1.0, "kd": 1.0},
            )
            module.teachers.fold_batch_norm = config.get("fold", True)
            module.prepare_distillation()
        module.to(device).train()
        optimizer = torch.optim.AdamW(module.parameter_groups(), lr=1e-3)
        module.log = module.log_dict = lambda *a, **k: None  # no trainer attached: logging is a no-op
        image = torch.randn(args.batch, 3, args.size, args.size, device=device)
        image = module.to_memory_format(image)
        batch = {"image": image, "label": (image[:, 1] > 0.3).long()}
        if config.get("cached"):
            with torch.no_grad():
                logits, _ = module.teachers(image)
            batch["teacher_logits"] = torch.stack(logits, dim=1).half()
            module.teachers = type(module.teachers)([], "segmentation")  # prove the teachers are not used
        times = []
        for step in range(args.steps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = module.training_step(batch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:
                times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"seconds": sorted(times)[len(times) // 2], "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--rounds", type=int, default=3, help="times each configuration runs (in turn); median reported"
    )
    parser.add_argument("--teacher-width", type=int, default=8, help="8: the student's size class; 64: the 31M U-Net")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)  # internal: one configuration
    args = parser.parse_args()
    if args.config is not None:
        print(json.dumps(measure(CONFIGS[args.config], args)))
        return
    import torch

    print(
        f"student slim U-Net w8, teachers slim U-Net w{args.teacher_width}, batch {args.batch} x 3 x {args.size}^2, "
        f"{args.device}, {'channels_last' if args.channels_last else 'NCHW'}, {torch.get_num_threads()} threads, "
        f"median of {args.steps} steps, median of {args.rounds} rounds"
    )
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name in CONFIGS:
            command = [sys.executable, __file__, "--config", name, *sys.argv[1:]]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(output.splitlines()[-1]))
    results = {
        name: {"seconds": statistics.median(r["seconds"] for r in rs), "peak_mib": max(r["peak_mib"] for r in rs)}
        for name, rs in runs.items()
    }
    base, one = results["no KD"]["seconds"], results["1 teacher live"]["seconds"]
    print("\n| configuration | ms / step | vs no KD | vs 1 teacher | peak MiB |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {1000 * r['seconds']:.1f} | {r['seconds'] / base:.2f}x | {r['seconds'] / one:.2f}x | {r['peak_mib']:.0f} |"
        )
    print(f"\nK=6 live / K=1: {results['6 teachers live']['seconds'] / one:.2f}x (target <= 2)")
    print(f"K=6 cached / no KD: {results['6 teachers cached']['seconds'] / base:.2f}x (target <= 1.2)")


if __name__ == "__main__":
    main()
