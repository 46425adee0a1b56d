"""Pre-training cost of MoCo v2 alone vs MoCo v2 + similarity distillation (same backbone and batch).

    python benchmarks/bench_moco_distill.py [--backbone efficientnet_lite0] [--image-size 64]
        [--batch-size 32] [--steps 10] [--workers 2] [--device cpu|cuda]

Both modules train ``--steps`` optimiser steps on the same synthetic-video frames (one run,
same process); the teacher is a frozen MoCo encoder of the same backbone saved to a temporary
checkpoint. Prints images/s of each, the step-time ratio (target: distillation adds at most
30%: the teacher runs forward passes only, once for both views, batch norm folded), the peak memory (CUDA max allocated, or the
process's peak RSS on CPU) and the SSL loader's throughput at the same settings, to show the
loader is not the bottleneck.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import tempfile
import time
from pathlib import Path

import torch

from data_modules.surgical import SurgicalSSLDataModule
from data_modules.surgical_layout import extract_dataset_frames
from data_modules.synth_surgical import write_synthetic_surgical
from distill.modules import MoCoDistillModule, MoCoModule

MAX_OVERHEAD = 0.30  # distillation may cost at most 1.3x the step of MoCo alone


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_rate(model, batches: list[dict], device: torch.device) -> tuple[float, float]:
    """(images/s, peak MB) over the batches after one warm-up step; images = frames (view pairs)."""
    model.to(device).train()
    optimizer = torch.optim.SGD([p for g in model.parameter_groups() for p in g["params"]], lr=0.01, momentum=0.9)

    def step(batch: dict) -> None:
        batch = {"views": [v.to(device, non_blocking=True) for v in batch["views"]], "label": batch["label"].to(device)}
        model.update_momentum_encoders()
        outputs = model.training_outputs(batch)
        terms = model.loss_terms(batch, outputs)
        loss = sum(model.loss_weights[name] * value for name, value in terms.items())
        model.enqueue_keys(outputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    images = sum(len(b["label"]) for b in batches[1:])
    return images / (time.perf_counter() - start), peak_memory_mb(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--queue-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    options = {"backbone": args.backbone, "proj_hidden_dim": 512, "proj_dim": 64, "queue_size": args.queue_size}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_surgical(tmp / "cholec80", num_videos=4, seed=0, size=(96, 120), duration_s=(20.0, 30.0))
        extract_dataset_frames(
            tmp / "cholec80", tmp / "frames", fps=5, size=(72, 72), workers=args.workers, progress=False
        )
        data = SurgicalSSLDataModule(
            str(tmp / "frames"),
            str(tmp / "cholec80"),
            fps=5,
            image_size=args.image_size,
            resize_size=args.image_size + 8,
            batch_size=args.batch_size,
            num_workers=args.workers,
        )
        data.setup("fit")
        loader = data.train_dataloader()
        batches = list(itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), args.steps + 1))
        start = time.perf_counter()
        loaded = sum(
            len(b["label"])
            for b in itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), args.steps)
        )
        loader_rate = loaded / (time.perf_counter() - start)

        teacher = MoCoModule(**options, freeze_backbone=True)
        teacher_path = tmp / "teacher.ckpt"
        torch.save(
            {"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams), "network_family": "moco"},
            teacher_path,
        )
        moco = MoCoModule(**options)
        distill = MoCoDistillModule(teacher_checkpoint=str(teacher_path), **options)
        distill.prepare_distillation()
        moco_rate, moco_peak = train_rate(moco, batches, device)
        distill_rate, distill_peak = train_rate(distill, batches, device)

    overhead = moco_rate / distill_rate - 1
    print(
        f"{args.backbone}, {args.image_size} px, batch {args.batch_size}, K {args.queue_size}, {device}, {args.steps} steps"
    )
    print(f"MoCo v2:                {moco_rate:8.1f} images/s, peak {moco_peak:,.0f} MB")
    print(f"MoCo v2 + distillation: {distill_rate:8.1f} images/s, peak {distill_peak:,.0f} MB")
    print(
        f"step-time ratio: {1 + overhead:.2f} (distillation adds {100 * overhead:.0f}%; target <= {100 * MAX_OVERHEAD:.0f}%): "
        f"{'met' if overhead <= MAX_OVERHEAD else 'NOT met'}"
    )
    print(
        f"SSL loader ({args.workers} workers): {loader_rate:8.1f} view pairs/s "
        f"({'not' if loader_rate > moco_rate else 'IS'} the bottleneck)"
    )


if __name__ == "__main__":
    main()
