"""Named, weighted loss terms (torchdistill style).

A method computes its loss terms as a ``{name: scalar}`` mapping (logged as they are) and the
config's ``loss_weights`` picks and weights them. :func:`check_loss_weights` runs at
construction time so a typo in a YAML key fails before training starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from distill.errors import DataError

__all__ = ["check_loss_weights", "weighted_sum"]


def check_loss_weights(weights: Mapping[str, float], available: Iterable[str], owner: str) -> None:
    """Raise DataError if ``weights`` names a loss term that ``owner`` does not compute, or a
    weight is negative or not finite.

    Args:
        weights: loss term name -> weight, as written in the config.
        available: names of the terms ``owner`` can compute.
        owner: who is asking (a method or module name), for the error message.
    """
    available = list(available)
    for name in weights:
        if name not in available:
            raise DataError(f"{owner}: unknown loss term {name!r} in loss_weights; available: {', '.join(available)}")
        if not math.isfinite(weights[name]) or weights[name] < 0:
            raise DataError(f"{owner}: loss_weights.{name} must be a finite number >= 0, got {weights[name]}")


def weighted_sum(terms: Mapping[str, Tensor], weights: Mapping[str, float], owner: str = "loss") -> Tensor:
    """Sum of ``weight * term`` over the names in ``weights``.

    Terms without a weight are ignored (the caller may still log them). Zero-weight terms are
    skipped, so they add no gradient path (and a NaN in one cannot poison the total).

    Args:
        terms: name -> scalar tensor, all on one device.
        weights: name -> weight; every name must be in ``terms``.
        owner: who is asking, for the error message.

    Returns:
        scalar tensor (0 when every weight is 0).
    """
    check_loss_weights(weights, terms.keys(), owner)
    weighted = [weight * terms[name] for name, weight in weights.items() if weight != 0]
    if not weighted:
        device = next(iter(terms.values())).device if terms else None
        return torch.zeros((), device=device)
    return sum(weighted[1:], weighted[0])
