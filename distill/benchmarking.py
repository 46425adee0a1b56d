"""Measurements shared by the results tables and ``benchmarks/``: parameters, FLOPs, CPU latency."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Floating-point operations of one forward pass (torch's FLOP counter: 2 per multiply-add)."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(*input_shape))
    return counter.get_total_flops()


@torch.no_grad()
def latency_ms(model: nn.Module, input_shape: Sequence[int], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall-clock milliseconds of one eval-mode forward pass of a batch of ``input_shape`` on CPU."""
    model.eval()
    x = torch.randn(*input_shape)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1000.0 * sorted(times)[len(times) // 2]
