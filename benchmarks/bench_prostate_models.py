"""Prostate model zoo benchmark (not a test): parameters, FLOPs, CPU latency, training throughput.

Targets (issue 2): student latency at least 5x lower than the teacher's; a distillation
training step costs at most the student step plus one teacher forward (ratio reported).

    python benchmarks/bench_prostate_models.py [--size 384] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from distill.benchmarking import count_flops, latency_ms
from distill.models import build_segmentation_network, count_parameters
from distill.modules import SegDistillModule, SegmentationModule

ZOO = {
    "teacher unet (width 64)": ("unet", {"width": 64}),
    "student slim_unet (width 8)": ("slim_unet", {"width": 8}),
    "student mobile_unet (mobilenetv3_small_100)": ("mobile_unet", {}),
}


class RandomSlices(Dataset):
    def __init__(self, size: int, length: int) -> None:
        self.size, self.length = size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        return {
            "image": torch.randn(3, self.size, self.size, generator=g),
            "label": (torch.rand(self.size, self.size, generator=g) > 0.7).long(),
        }


class StepTimer(L.Callback):
    """Wall time of each training step after ``warmup`` steps."""

    def __init__(self, warmup: int = 2) -> None:
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)


def slices_per_second(module: L.LightningModule, size: int, batch_size: int, steps: int) -> float:
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=steps + timer.warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(RandomSlices(size, batch_size * (steps + timer.warmup)), batch_size=batch_size))
    return batch_size / (sum(timer.times) / len(timer.times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--train-size", type=int, default=128, help="slice size for the training-throughput part")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU threads: {args.threads}; input (B, 3, {args.size}, {args.size})\n")
    print(f"{'network':46s} {'params':>8s} {'GFLOPs':>8s} {'ms b=1':>9s} {'ms/slice b=16':>14s}")
    latencies = {}
    for label, (name, kwargs) in ZOO.items():
        net = build_segmentation_network(name, 3, 2, **kwargs)
        flops = count_flops(net, (1, 3, args.size, args.size))
        b1 = latency_ms(net, (1, 3, args.size, args.size), repeats=5)
        b16 = latency_ms(net, (16, 3, args.size, args.size), repeats=2, warmup=1) / 16
        latencies[label] = b1
        print(f"{label:46s} {count_parameters(net) / 1e6:7.2f}M {flops / 1e9:8.2f} {b1:9.1f} {b16:14.1f}")
    teacher_ms = latencies["teacher unet (width 64)"]
    for label, ms in latencies.items():
        if label.startswith("student"):
            verdict = "meets" if teacher_ms / ms >= 5 else "MISSES"
            print(f"speed-up of {label} over the teacher (b=1): {teacher_ms / ms:.1f}x ({verdict} the 5x target)")

    size, batch = args.train_size, args.train_batch
    print(f"\nTraining throughput, student slim_unet, batch {batch} at {size}x{size}:")
    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_segmentation_network("unet", 3, 2, width=64)
        teacher_path = Path(tmp) / "teacher.safetensors"
        save_file(teacher.state_dict(), str(teacher_path))
        teacher_fwd_ms = latency_ms(teacher, (batch, 3, size, size), repeats=3)
        student_sps = slices_per_second(SegmentationModule(network="slim_unet"), size, batch, args.train_steps)
        distill = SegDistillModule(
            teacher_checkpoint=str(teacher_path),
            teacher_network="unet",
            teacher_network_kwargs={"width": 64},
            network="slim_unet",
            feature_pairs=[{"student": "down_2", "teacher": "down_2"}, {"student": "down_4", "teacher": "down_4"}],
        )
        distill_sps = slices_per_second(distill, size, batch, args.train_steps)
    student_step, distill_step = 1000 * batch / student_sps, 1000 * batch / distill_sps
    bound = student_step + teacher_fwd_ms
    print(f"  SegmentationModule : {student_sps:7.1f} slices/s ({student_step:.0f} ms/step)")
    print(f"  SegDistillModule   : {distill_sps:7.1f} slices/s ({distill_step:.0f} ms/step)")
    print(f"  teacher forward    : {teacher_fwd_ms:.0f} ms/step (no autograd, eval mode)")
    print(f"  distill step / (student step + teacher forward) = {distill_step / bound:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
