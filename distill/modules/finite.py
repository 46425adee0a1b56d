"""Non-finite numbers stop a run: a NaN/inf loss, teacher output, weight or buffer is named, never saved.

A learning rate far too high, a damaged teacher file or a corrupted cache all end the same way
without these checks: training goes on with NaN, and ``best.ckpt`` is written full of NaN/inf
(Lightning's ``ModelCheckpoint`` ranks a NaN score below every real one but still saves it while
its top-k is not full). Here:

- teachers and teacher caches are checked when they are read (:func:`raise_if_non_finite`);
- :class:`~distill.modules.base.DistillModuleBase` checks the loss of every training step (one
  ``isfinite`` per step) and, when it is not finite, names the terms and the outputs (student,
  teachers) that went first;
- every checkpoint's ``state_dict`` is checked before it is written, so no file ever holds them.

Each raises :class:`~distill.errors.DataError`: one line naming what went non-finite and where.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from distill.errors import DataError


def non_finite_tensors(named: Iterator[tuple[str, Any]] | Mapping[str, Any]) -> list[str]:
    """``"name (n nan, m inf)"`` for each floating-point tensor of ``named`` holding NaN or inf."""
    found = []
    for name, value in named.items() if isinstance(named, Mapping) else named:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            nan = int(torch.isnan(value).sum())
            found.append(f"{name} ({nan} nan, {int((~finite).sum()) - nan} inf)")
    return found


def flatten_tensors(outputs: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in nested dicts, lists and tuples, e.g. ``teacher_logits.1``."""
    if isinstance(outputs, torch.Tensor):
        yield prefix or "output", outputs
    elif isinstance(outputs, Mapping):
        for key, value in outputs.items():
            yield from flatten_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(outputs, (list, tuple)):
        for index, value in enumerate(outputs):
            yield from flatten_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def raise_if_non_finite(named: Mapping[str, Any], where: str, what: str, hint: str) -> None:
    """DataError ``"<where>: non-finite <what>: <names> (<hint>)"`` if any tensor of ``named`` is NaN/inf."""
    found = non_finite_tensors(named)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise DataError(f"{where}: non-finite {what}: {shown} ({hint})")


def check_training_loss(
    loss: torch.Tensor, terms: Mapping[str, torch.Tensor], outputs: Any, epoch: int, step: int
) -> None:
    """Raise if the step's ``loss`` is NaN/inf, naming its non-finite terms and outputs (e.g.
    ``teacher_logits``: the teachers; ``logits``: the student) at ``epoch``/``step``."""
    if bool(torch.isfinite(loss.detach())):
        return
    terms_found = [f"{name}={float(value):g}" for name, value in terms.items() if not torch.isfinite(value).all()]
    outputs_found = non_finite_tensors(flatten_tensors(outputs))
    detail = "; ".join(
        part
        for part in (
            f"terms {', '.join(terms_found)}" if terms_found else "",
            f"in {', '.join(outputs_found[:4])}" if outputs_found else "",
        )
        if part
    )
    raise DataError(
        f"training stopped at epoch {epoch}, step {step}: the loss is {float(loss):g} ({detail or 'no term named'}); "
        "nothing from this step on is saved (lower the learning rate, or check the inputs and teachers)"
    )
