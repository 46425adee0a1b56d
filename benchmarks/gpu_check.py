"""The GPU check in one call: a few training steps of each task through ``distill fit`` with the GPU
presets, on synthetic data in the real layouts.

    bash benchmarks/gpu_check.sh                       # cuda, paper size (under 8 minutes on one H100)
    python benchmarks/gpu_check.py --device cpu --scale tiny --steps 3   # the same path on a CPU, at toy size

Runs, in order (each a ``distill fit`` in this process, ``--steps`` optimiser steps after one warm-up step):

1. prostate teacher: experiments/prostate/gpu/teacher.yaml (31M U-Net at 384 px);
2. prostate KD student with that teacher live (experiments/prostate/gpu/student_kd.yaml);
3. the same student with the teacher cache (built on the device first, then read memory-mapped);
4. MoCo teacher head, then MoCo + distillation (experiments/surgical/gpu/*.yaml, ResNet-50, 224 px,
   batch 128) on JPEG frames;
5. the prostate teacher again as a 1-process DDP fit (experiments/gpu/ddp.yaml).

On cuda every training step runs under ``torch.cuda.set_sync_debug_mode("error")``: a host-device
sync in a step fails the run, naming its line. Prints, per run: ms per step, samples/s of the step,
the loader's samples/s over the same steps (time spent waiting for batches), and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
SCALES = {  # what changes between the GPU's paper size and a CPU's toy size
    "paper": {"prostate": [], "teacher": [], "student": [], "moco": [], "moco_size": (250, 300), "prostate_size": 384},
    "tiny": {
        "prostate": [
            "--data.init_args.image_size=32",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=2",
        ],
        "teacher": ["--model.init_args.network_kwargs.width=4"],
        "student": ["--model.init_args.network_kwargs.width=4"],
        "moco": [
            "--model.init_args.backbone=test_efficientnet",
            "--model.init_args.proj_hidden_dim=32",
            "--model.init_args.proj_dim=16",
            "--model.init_args.queue_size=64",
            "--data.init_args.image_size=32",
            "--data.init_args.resize_size=36",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=2",
            "--data.init_args.fps=5",
        ],
        "moco_size": (48, 60),
        "prostate_size": 64,
    },
}


class StepTimer(L.Callback):
    """Times the training steps after the first (warm-up, compilation): the step itself and the wait
    for its batch; on cuda, every step under ``set_sync_debug_mode("error")``. Writes ``out`` (JSON)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.steps: list[float] = []
        self.waits: list[float] = []
        self.samples = 0
        self._batch_end: float | None = None
        self._start = 0.0

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = self._now(trainer)
        if self._batch_end is not None:
            self.waits.append(self._start - self._batch_end)
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        end = self._now(trainer)
        if trainer.global_step > 1:  # the first step warms up (and compiles)
            self.steps.append(end - self._start)
            self.samples += pl_module.batch_size(batch)
        self._batch_end = end

    def on_train_end(self, trainer, pl_module) -> None:
        device = trainer.strategy.root_device
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        step_s, wait_s = sum(self.steps), sum(self.waits[-len(self.steps) :]) if self.steps else 0.0
        per_step = self.samples / max(len(self.steps), 1)
        Path(self.out).write_text(
            json.dumps(
                {
                    "ms_per_step": 1000 * step_s / max(len(self.steps), 1),
                    "samples_per_s": self.samples / step_s if step_s else float("nan"),
                    "loader_samples_per_s": per_step * len(self.steps) / wait_s if wait_s else float("inf"),
                    "peak_gb": peak,
                }
            )
        )


def fit(name: str, config: str, out: Path, steps: int, device: str, *overrides: str) -> dict:
    """``distill fit`` of ``config`` for 1 + ``steps`` steps, timed; its figures."""
    from distill.cli import main

    timer = out / f"{name}.json"
    main(
        [
            "fit",
            "--config",
            str(REPO / "experiments" / config),
            *overrides,
            f"--trainer.accelerator={device}",
            f"--trainer.max_steps={steps + 1}",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={out / name}",
            "--trainer.callbacks+=gpu_check.StepTimer",
            f"--trainer.callbacks.out={timer}",
        ]
    )
    return json.loads(timer.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--scale", default="paper", choices=sorted(SCALES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device here; use --device cpu --scale tiny for the CPU path")
    sys.path.insert(0, str(Path(__file__).parent))  # StepTimer, by class path
    from data_modules.surgical_layout import extract_dataset_frames
    from data_modules.synth_prostate import write_synthetic_prostate
    from data_modules.synth_surgical import write_synthetic_surgical

    scale = SCALES[args.scale]
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    started = time.perf_counter()
    prostate = write_synthetic_prostate(out / "prostate", seed=0, scale=0.2, size=scale["prostate_size"])
    surgical = out / "surgical"
    write_synthetic_surgical(
        surgical / "cholec80", "cholec80", num_videos=10, seed=0, size=scale["moco_size"], duration_s=(12.0, 20.0)
    )
    extract_dataset_frames(
        surgical / "cholec80", surgical / "frames", "cholec80", fps=5, workers=os.cpu_count() or 2, progress=False
    )
    os.environ.update(CHOLEC80_DATA=str(surgical / "cholec80"), CHOLEC80_FRAMES=str(surgical / "frames"))

    data = [f"--data.init_args.data_root={prostate}", *scale["prostate"]]
    results = {}
    results["prostate teacher (live)"] = fit(
        "teacher", "prostate/gpu/teacher.yaml", out, args.steps, args.device, *data, *scale["teacher"]
    )
    teacher = f"--model.init_args.teacher_checkpoint={out / 'teacher'}"
    student = [*data, *scale["student"], teacher]
    results["prostate KD student, live teacher"] = fit(
        "student", "prostate/gpu/student_kd.yaml", out, args.steps, args.device, *student
    )
    cached = [
        *student,
        "--model.init_args.loss_weights={dice: 1, lovasz: 1, kd: 1}",
        "--model.init_args.teacher_cache=teacher_cache.safetensors",
        "--data.init_args.intensity_augmentation=false",
    ]
    results["prostate KD student, cached teacher"] = fit(
        "cached", "prostate/gpu/student_kd.yaml", out, args.steps, args.device, *cached
    )
    moco = [*scale["moco"], "--model.init_args.backbone_weights=null"]
    results["MoCo teacher head"] = fit(
        "moco_teacher", "surgical/gpu/moco_teacher.yaml", out, args.steps, args.device, *moco
    )
    results["MoCo + distillation"] = fit(
        "moco_distill",
        "surgical/gpu/moco_distill.yaml",
        out,
        args.steps,
        args.device,
        *moco,
        f"--model.init_args.teacher_checkpoint={out / 'moco_teacher'}",
    )
    results["prostate teacher, DDP (1 process)"] = fit(
        "ddp",
        "prostate/gpu/teacher.yaml",
        out,
        args.steps,
        args.device,
        "--config",
        str(REPO / "experiments/gpu/ddp.yaml"),
        "--trainer.devices=1",
        *data,
        *scale["teacher"],
    )
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"\nGPU check on {card} ({args.scale} size, {args.steps} timed steps per run, {time.perf_counter() - started:.0f} s in all)"
    )
    print("| run | ms/step | samples/s (step) | loader samples/s | peak GPU GB |\n|---|---|---|---|---|")
    for name, figures in results.items():
        print(
            f"| {name} | {figures['ms_per_step']:.1f} | {figures['samples_per_s']:.0f} | "
            f"{figures['loader_samples_per_s']:.0f} | {figures['peak_gb']:.2f} |"
        )


if __name__ == "__main__":
    main()
