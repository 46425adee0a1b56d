"""Capture intermediate features by module path with forward hooks (torchdistill style).

The network code does not change for distillation: the YAML names the layers, e.g.
``down_4`` or ``encoder.blocks.3``, and :class:`FeatureTaps` records their outputs.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn

from distill.errors import DataError


def resolve_module(model: nn.Module, path: str, owner: str = "model") -> nn.Module:
    """``model.get_submodule(path)`` with an error that suggests the closest real paths."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.4) or names[:10]
        raise DataError(f"{owner}: no module at path {path!r}; close matches: {', '.join(close)}") from None


class FeatureTaps:
    """Records the outputs of the modules at ``paths`` on every forward pass of ``model``.

    Usage::

        taps = FeatureTaps(net, ["down_2", "down_4"])
        logits = net(x)
        feats = taps.pop()   # [(B, C1, H1, W1), (B, C2, H2, W2)] in the order of ``paths``

    Safe against ``copy.deepcopy`` of the tapped model (e.g. a momentum encoder): the copy
    carries the hooks along, but they only record for the modules tapped here, so running the
    copy never writes into these taps. Tap the copy with its own ``FeatureTaps`` if needed.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], owner: str = "model") -> None:
        self.paths = list(paths)
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in self.paths:
            module = resolve_module(model, path, owner)
            self._handles.append(module.register_forward_hook(self._recorder(path, id(module))))

    def _recorder(self, path: str, module_id: int):
        def record(module: nn.Module, _inputs, output) -> None:
            if id(module) != module_id:  # a deep copy of the tapped module: not ours to record
                return
            self._outputs[path] = output[0] if isinstance(output, (tuple, list)) else output

        return record

    def pop(self) -> list[torch.Tensor]:
        """The features of the last forward pass, in ``paths`` order; clears them."""
        missing = [p for p in self.paths if p not in self._outputs]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the last forward pass")
        features = [self._outputs[p] for p in self.paths]
        self._outputs.clear()
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
