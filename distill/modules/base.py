"""Shared base of every LightningModule here: optimiser injection, LR schedule, channels_last."""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable


class DistillModuleBase(L.LightningModule):
    """Owns what every method configures the same way.

    Args:
        optimizer: a callable ``params -> Optimizer``; in YAML ``class_path: torch.optim.AdamW``
            with ``init_args: {lr: ...}`` (LightningCLI dependency injection).
        lr_schedule: ``"cosine"`` decays the LR per step to 0 over the whole run (length taken
            from the trainer, so it follows ``max_epochs`` without being repeated), with
            ``warmup_steps`` of linear warm-up; ``"constant"`` keeps it.
        channels_last: run convolutions in NHWC memory format (faster with mixed precision on
            GPUs and with oneDNN on CPUs). Mixed precision itself is ``trainer.precision``.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.channels_last = channels_last

    def to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.lr_schedule == "constant":
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.warmup_steps

        def cosine_with_warmup(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
