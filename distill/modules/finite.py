"""Non-finite numbers stop a run: a NaN/inf loss, teacher output, weight or buffer is named, never saved.

A learning rate far too high, a damaged teacher file or a corrupted cache all end the same way
without these checks: training goes on with NaN, and ``best.ckpt`` is written full of NaN/inf
(Lightning's ``ModelCheckpoint`` ranks a NaN score below every real one but still saves it while
its top-k is not full). Here:

- teachers and teacher caches are checked when they are read (:func:`raise_if_non_finite`);
- :class:`~distill.modules.base.DistillModuleBase` watches the loss of every training step on the
  device (:class:`NonFiniteLossWatch`: no host sync per step), reads it every few steps and at
  epoch end, and when it went non-finite names the step and the terms and outputs (student,
  teachers) that were;
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


class NonFiniteLossWatch:
    """Watches every training step's loss on its device and reads the result on the host only every
    ``every`` steps and at epoch end (one sync then, none per step): a non-finite loss stops the run
    at the next check, naming the step it first happened at and its non-finite terms and outputs.

    Under mixed precision with a gradient scaler a non-finite loss is a step the scaler skips, not
    an error; only more than ``tolerated_run`` non-finite steps in a row stop the run.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.state: dict[str, torch.Tensor] = {}

    def update(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor], outputs: Any, step: int) -> None:
        """Record (device-side) whether ``loss`` is finite at ``step``, and which terms and outputs are not."""
        named = [*((f"term {k}", v) for k, v in terms.items()), *flatten_tensors(outputs)]
        named = [(name, value) for name, value in named if value.is_floating_point()]
        flags = torch.stack([~torch.isfinite(value.detach()).all() for _, value in named])
        bad = ~torch.isfinite(loss.detach())
        if not self.state or len(named) != len(self.names):
            self.names = [name for name, _ in named]
            zero = torch.zeros((), dtype=torch.long, device=loss.device)
            self.state = {"first": zero - 1, "flags": torch.zeros_like(flags), "run": zero, "longest": zero}
        state = self.state
        first_now = bad & (state["first"] < 0)
        state["first"] = torch.where(first_now, torch.full_like(state["first"], step), state["first"])
        state["flags"] = torch.where(first_now, flags.to(state["flags"].device), state["flags"])
        state["run"] = torch.where(bad, state["run"] + 1, torch.zeros_like(state["run"]))
        state["longest"] = torch.maximum(state["longest"], state["run"])

    def check(self, epoch: int, step: int, tolerated_run: int = 0) -> None:
        """Read the record (one host sync) and raise a one-line DataError if the loss went non-finite
        (more than ``tolerated_run`` steps in a row); then start a new record."""
        if not self.state:
            return
        first, longest = torch.stack([self.state["first"], self.state["longest"]]).tolist()
        flags = self.state["flags"].tolist()
        self.state = {}
        if first < 0 or longest <= tolerated_run:
            return
        found = [name for name, flag in zip(self.names, flags) if flag]
        skipped = (
            f"{longest} steps in a row, more than the {tolerated_run} the gradient scaler may skip; "
            if tolerated_run
            else ""
        )
        raise DataError(
            f"training stopped at epoch {epoch}, step {step}: the loss went non-finite at step {first} "
            f"({skipped}non-finite: {', '.join(found[:5]) or 'the loss only'}); nothing from that step on is saved "
            "(lower the learning rate, or check the inputs and teachers)"
        )
