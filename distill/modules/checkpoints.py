"""Loading trained networks from checkpoints safely (``weights_only=True`` / safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distill.errors import DataError
from distill.models import build_segmentation_network


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest ``best*.ckpt`` (else ``last*.ckpt``) under a run directory."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for pattern in ("best*.ckpt", "last*.ckpt"):
            found = sorted(path.rglob(pattern), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1]
        raise DataError(f"{path}: no best*.ckpt or last*.ckpt under this run directory (train the teacher first)")
    raise DataError(f"{path}: checkpoint not found (train the teacher first, or fix the path)")


def load_state(path: Path) -> dict:
    """Read a Lightning ``.ckpt``, a ``torch.save``d state dict or a ``.safetensors`` file, never unpickling code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return {"state_dict": load_file(str(path))}
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is the same user problem
        raise DataError(f"{path}: unreadable checkpoint ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise DataError(f"{path}: not a checkpoint or state dict (got {type(payload).__name__})")
    return payload if "state_dict" in payload else {"state_dict": payload}


def load_segmentation_network(
    path: str | Path, network: str | None = None, network_kwargs: dict | None = None, prefix: str = "net."
) -> nn.Module:
    """Rebuild a segmentation network from a checkpoint and load its weights (frozen, eval mode).

    The architecture comes from the checkpoint's hyper-parameters (``network``,
    ``network_kwargs``, ``in_channels``, ``num_classes``, saved by :class:`SegmentationModule`);
    for a plain state dict, pass ``network``/``network_kwargs`` (``in_channels``/``num_classes``
    are then inferred as 3 and 2 unless given in ``network_kwargs``).
    """
    path = resolve_checkpoint(path)
    payload = load_state(path)
    hparams = dict(payload.get("hyper_parameters") or {})
    name = network or hparams.get("network")
    if name is None:
        raise DataError(f"{path}: checkpoint records no network architecture; set teacher_network in the config")
    kwargs = dict(hparams.get("network_kwargs") or {}) if network is None else dict(network_kwargs or {})
    in_channels = kwargs.pop("in_channels", hparams.get("in_channels", 3))
    num_classes = kwargs.pop("num_classes", hparams.get("num_classes", 2))
    net = build_segmentation_network(name, in_channels=in_channels, num_classes=num_classes, **kwargs)
    state = payload["state_dict"]
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        summary = " ".join(str(err).split())[:300]
        raise DataError(f"{path}: checkpoint does not match network {name!r} {kwargs}: {summary}") from None
    return net.eval().requires_grad_(False)
