"""The gating network of the adaptive ("learned") multi-teacher rule."""

from __future__ import annotations

import torch
from torch import nn


class TeacherGate(nn.Module):
    """Predicts how much to trust each teacher, per pixel or per image.

    Input: the student's input slices and the teachers' probabilities, concatenated on channels.
    The last layer starts at zero, so training starts from the plain mean of the teachers.

    Args:
        in_channels: input slices S + K * C teacher probability maps.
        num_teachers: K.
        width: hidden channels.
        per_sample: average the logits over the image (one weight per teacher and image).
    """

    def __init__(self, in_channels: int, num_teachers: int, width: int = 16, per_sample: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, num_teachers, 1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)
        self.per_sample = per_sample

    def forward(self, image: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """image (B, S, H, W), teacher_probs (K, B, C, H, W) -> gate logits (B, K, H, W) or (B, K, 1, 1)."""
        stacked = teacher_probs.movedim(0, 1).flatten(1, 2)  # (B, K*C, H, W)
        logits = self.body(torch.cat([image, stacked.to(image.dtype)], dim=1))
        return logits.mean(dim=(-2, -1), keepdim=True) if self.per_sample else logits
