"""Throughput of the surgical data pipeline on synthetic Cholec80 videos (CPU).

    python benchmarks/bench_surgical_data.py [--videos 4] [--duration-s 60] [--workers 2]

Measures ``extract-frames`` (decoded and written frames per second) and each DataModule's
training loader with ``--workers`` loader processes. Target: the self-supervised loader
delivers at least 200 augmented 224x224 view pairs per second on 2 cores. Besides the
wall-clock rate (which other load on the machine lowers), each loader's rate per CPU second
of the main process and its workers is measured, and the rate on ``--workers`` dedicated
cores derived from it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from data_modules.surgical import PhaseFeatureDataModule, SurgicalPhaseDataModule, SurgicalSSLDataModule
from data_modules.surgical_layout import extract_dataset_frames, phase_labels_at
from data_modules.synth_surgical import write_synthetic_surgical
from distill.formats.features import save_video_features
from distill.formats.phases import read_phase_file

SSL_TARGET_PAIRS_PER_S = 200.0


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live children (the loader workers)."""
    processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
    return sum(sum(process.cpu_times()[:2]) for process in processes)


def loader_rate(loader, max_batches: int, items_of) -> tuple[float, float]:
    """Items per wall-clock second and per CPU second (main process + workers) over ``max_batches``
    batches (epochs repeat), after one warm-up batch (workers starting)."""
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    next(batches)
    count, start, cpu_start = 0, time.perf_counter(), cpu_seconds()
    for _, batch in zip(range(max_batches), batches):
        count += items_of(batch)
    return count / (time.perf_counter() - start), count / (cpu_seconds() - cpu_start)


def report(name: str, rates: tuple[float, float], unit: str, workers: int) -> float:
    """Print the measured rate and the rate ``workers`` dedicated cores would give; returns the latter."""
    wall, per_cpu_second = rates
    print(
        f"{name}: {wall:,.0f} {unit}/s measured, {per_cpu_second:,.0f} per CPU second "
        f"-> {workers * per_cpu_second:,.0f} {unit}/s on {workers} dedicated cores"
    )
    return workers * per_cpu_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per loader")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root, frames_dir, features_dir = Path(tmp) / "cholec80", Path(tmp) / "frames", Path(tmp) / "features"
        write_synthetic_surgical(root, num_videos=args.videos, duration_s=(args.duration_s, args.duration_s))
        decoded = sum(len(read_phase_file(p)[0]) for p in (root / "phase_annotations").iterdir())

        start = time.perf_counter()
        extract_dataset_frames(root, frames_dir, fps=5, workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
        written = sum(1 for _ in frames_dir.glob("*/*.jpg"))
        print(
            f"extract-frames (5 fps, {args.workers} workers): {decoded / seconds:,.0f} decoded frames/s, "
            f"{written / seconds:,.0f} written 250x250 frames/s"
        )

        common = dict(data_root=root, num_workers=args.workers, val_fraction=0.2)  # fitting needs validation videos
        ssl = SurgicalSSLDataModule(frames_dir, fps=5, batch_size=64, **common)
        ssl.setup("fit")
        pairs = report(
            "SurgicalSSLDataModule",
            loader_rate(ssl.train_dataloader(), args.batches, lambda b: len(b["index"])),
            "view pairs",
            args.workers,
        )
        verdict = "met" if pairs >= SSL_TARGET_PAIRS_PER_S else "NOT met"
        print(
            f"SSL target {SSL_TARGET_PAIRS_PER_S:.0f} view pairs/s on 2 cores: {verdict} (judged on the dedicated-core rate; "
            f"load average now {os.getloadavg()[0]:.1f})"
        )

        phase = SurgicalPhaseDataModule(frames_dir, fps=5, batch_size=64, **common)
        phase.setup("fit")
        report(
            "SurgicalPhaseDataModule",
            loader_rate(phase.train_dataloader(), args.batches, lambda b: len(b["index"])),
            "frames",
            args.workers,
        )

        rng = np.random.default_rng(0)
        for video, annotation in phase.annotations.items():
            frames, _ = phase_labels_at(annotation, "cholec80", fps=5)
            save_video_features(features_dir, video, rng.standard_normal((len(frames), 2048), dtype=np.float32), frames)
        features = PhaseFeatureDataModule(features_dir, **common)
        features.setup("fit")
        report(
            "PhaseFeatureDataModule",
            loader_rate(features.train_dataloader(), args.batches, lambda b: b["features"].shape[-1]),
            "2048-d feature frames",
            args.workers,
        )


if __name__ == "__main__":
    main()
