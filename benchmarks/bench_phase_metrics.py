"""Time the relaxed-boundary phase evaluation on 40 videos x 10,000 frames (Cholec80 test-set scale).

Run: ``python benchmarks/bench_phase_metrics.py`` (the whole command with file parsing:
``benchmarks/bench_evaluate_phases_cli.py``). Ground truth: the 7 phases in order with
random lengths; predictions: the ground truth with shifted transitions and 5% random frames.
"""

from __future__ import annotations

import time

import numpy as np

from distill.metrics import evaluate_phases

N_VIDEOS, N_FRAMES, FPS = 40, 10_000, 1.0


def synthetic_video(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(gt, pred), each (N_FRAMES,) 0-based phase labels."""
    cuts = np.sort(rng.choice(np.arange(1, N_FRAMES), size=6, replace=False))
    gt = np.searchsorted(cuts, np.arange(N_FRAMES), side="right")
    pred = np.roll(gt, rng.integers(-20, 20))
    noisy = rng.random(N_FRAMES) < 0.05
    pred[noisy] = rng.integers(0, 7, noisy.sum())
    return gt, pred


def main() -> None:
    rng = np.random.default_rng(0)
    videos = {f"video{i:02d}": synthetic_video(rng) for i in range(N_VIDEOS)}
    evaluate_phases(videos, FPS)  # warm-up (first-call costs)
    for mode in ("corrected", "published"):
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            report = evaluate_phases(videos, FPS, mode=mode)
            timings.append(time.perf_counter() - start)
        print(
            f"{mode:>9}: {N_VIDEOS} videos x {N_FRAMES} frames in {1000 * min(timings):.1f} ms "
            f"(best of 5; accuracy {report.accuracy:.2f})"
        )


if __name__ == "__main__":
    main()
