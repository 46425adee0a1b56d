"""Time and peak memory of the MoCo test metrics (k-NN accuracy, similarity KL, top-k overlap) over
many held-out frames, computed in row blocks (distill.metrics.embedding.BLOCK_ROWS).

    python benchmarks/bench_embedding_metrics.py --frames 50000 --dim 128 [--threads 2] [--device cuda]

Prints, per metric, seconds and the peak RSS above the inputs (on the CPU; on a GPU also the peak
GPU memory). Dense (N, N) float32 matrices would need 4 N^2 bytes each: 10 GB at 50,000 frames.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from distill.metrics.embedding import BLOCK_ROWS, knn_accuracy, neighbour_overlap, similarity_kl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    teacher, student = (
        torch.nn.functional.normalize(torch.randn(args.frames, args.dim, generator=generator), dim=1).to(args.device)
        for _ in range(2)
    )
    labels = torch.randint(0, 7, (args.frames,), generator=generator).to(args.device)
    groups = torch.randint(0, 40, (args.frames,), generator=generator).to(args.device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{args.frames} frames x {args.dim}, blocks of {BLOCK_ROWS} rows, {args.threads} threads, {args.device}")
    for name, compute in (
        ("k-NN accuracy", lambda: knn_accuracy(student, labels, groups)),
        ("similarity KL", lambda: similarity_kl(teacher, student)),
        ("top-5 overlap", lambda: neighbour_overlap(teacher, student)),
    ):
        start = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - start
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        gpu = f", peak GPU {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if args.device.startswith("cuda") else ""
        print(f"{name}: {value:.4f} in {seconds:.1f} s, peak RSS +{extra:.0f} MB{gpu}")


if __name__ == "__main__":
    main()
