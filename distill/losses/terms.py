"""Named, weighted loss terms (torchdistill style).

A method computes its loss terms as a ``{name: scalar}`` mapping (logged as they are) and the
config's ``loss_weights`` picks and weights them. :func:`check_loss_weights` runs at
construction time so a typo in a YAML key fails before training starts.
:func:`over_labelled` evaluates a label term on the labelled slices of a semi-supervised batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from distill.errors import DataError

__all__ = ["check_loss_weights", "over_labelled", "weighted_sum"]


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
    """Sum of ``weight * term`` over the names in ``weights`` (checked once, at construction, by
    :func:`check_loss_weights`).

    Terms without a weight are ignored (the caller may still log them). Zero-weight terms are
    skipped, so they add no gradient path (and a NaN in one cannot poison the total).

    Args:
        terms: name -> scalar tensor, all on one device; every name of a non-zero weight must be here.
        weights: name -> weight.
        owner: who is asking, for the error message.

    Returns:
        scalar tensor (0 when every weight is 0).
    """
    try:
        weighted = [weight * terms[name] for name, weight in weights.items() if weight != 0]
    except KeyError as missing:
        raise ValueError(
            f"{owner}: loss term {missing.args[0]!r} has a weight but was not computed; computed: {', '.join(terms)}"
        ) from None
    if not weighted:
        device = next(iter(terms.values())).device if terms else None
        return torch.zeros((), device=device)
    return sum(weighted[1:], weighted[0])


def over_labelled(
    loss: Callable[..., Tensor], labelled: Tensor | None, *inputs: Tensor, dims: Iterable[int] = ()
) -> Tensor:
    """``loss(*inputs)`` over the samples that have a label: a label term of a semi-supervised batch.

    Unlabelled samples carry a placeholder label that must not count, so the loss sees the
    labelled rows only (its own reduction then averages over them). With no labelled sample the
    term is a zero that keeps a gradient path to ``inputs[0]`` (training goes on on the other
    terms; no 0/0, no NaN).

    Args:
        loss: ``(*inputs) -> scalar``.
        labelled: (B,) bool, True where the sample has a real label; ``None``: all are labelled.
        inputs: tensors with the batch along ``dims`` (default: dimension 0 of each), e.g.
            logits (B, C, H, W) and labels (B, H, W), or teacher logits (K, B, C, H, W) with dim 1.
        dims: batch dimension of each input (all 0 when empty).
    """
    if labelled is None:
        return loss(*inputs)
    dims = list(dims) or [0] * len(inputs)
    if len(dims) != len(inputs):
        raise ValueError(f"over_labelled: {len(inputs)} inputs but {len(dims)} batch dims")
    if (
        labelled.dtype != torch.bool
        or labelled.ndim != 1
        or any(x.shape[d] != labelled.numel() for x, d in zip(inputs, dims))
    ):
        raise ValueError(
            f"over_labelled: labelled must be a (B,) bool tensor matching the batch, got {labelled.dtype} {tuple(labelled.shape)}"
        )
    if bool(labelled.all()):
        return loss(*inputs)
    if not bool(labelled.any()):
        return inputs[0].sum() * 0.0
    index = labelled.nonzero().squeeze(1)
    return loss(*(x.index_select(d, index) for x, d in zip(inputs, dims)))
