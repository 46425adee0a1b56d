"""Loading trained networks from checkpoints safely (``weights_only=True`` / safetensors).

A Lightning module records its network family in the checkpoint (``checkpoint["network_family"]``);
:func:`load_network` rebuilds the architecture with that family's build function (every family
is listed in :mod:`distill.modules.families`) without the experiment's config. A caller that
also needs a file's hash (the teachers) reads it once: :func:`read_checkpoint_bytes`, then
:func:`decode_checkpoint` and :func:`build_network` on those bytes.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from distill.errors import DataError
from distill.modules.families import NETWORK_FAMILIES
from distill.modules.finite import raise_if_non_finite

FIT_COMPLETE = "fit_complete.json"  # written next to its checkpoints when a fit ends normally (FitCompletion)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or under a run directory the newest ``best*.ckpt`` (else ``last*.ckpt``) of a
    finished fit: one with :data:`FIT_COMPLETE` next to it (a run stopped before its end does not count)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        unfinished = False
        for pattern in ("best*.ckpt", "last*.ckpt"):
            found = sorted(path.rglob(pattern), key=lambda p: p.stat().st_mtime)
            finished = [p for p in found if (p.parent / FIT_COMPLETE).is_file()]
            if finished:
                return finished[-1]
            unfinished = unfinished or bool(found)
        if unfinished:
            raise DataError(
                f"{path}: no finished run here (checkpoints, but no {FIT_COMPLETE} next to them: the training was "
                "stopped before its end); finish it or point to a checkpoint file"
            )
        raise DataError(f"{path}: no best*.ckpt or last*.ckpt under this run directory (train the teacher first)")
    raise DataError(f"{path}: checkpoint not found (train the teacher first, or fix the path)")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's content (identifies exactly which trained weights were used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint_bytes(path: Path) -> bytes:
    """The whole file, refused when empty (an interrupted write or a failed copy)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err.strerror or err})") from None
    if not data:
        raise DataError(
            f"{path}: empty file (0 bytes), not a checkpoint: its writing was interrupted or the copy failed"
        )
    return data


def decode_checkpoint(path: Path, data: bytes) -> dict:
    """The checkpoint in ``data`` (the bytes of ``path``, named in errors): a Lightning ``.ckpt``, a
    ``torch.save``d state dict or a ``.safetensors`` file, never unpickling code; ``{"state_dict": ...}``
    at least."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load as load_safetensors

            return {"state_dict": load_safetensors(data)}
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is the same user problem
        reason = (str(err).strip().splitlines() or ["no message"])[0]
        raise DataError(
            f"{path}: unreadable checkpoint, truncated or corrupt ({type(err).__name__}: {reason})"
        ) from None
    if not isinstance(payload, dict):
        raise DataError(f"{path}: not a checkpoint or state dict (got {type(payload).__name__})")
    return payload if "state_dict" in payload else {"state_dict": payload}


def load_state(path: Path) -> dict:
    """Read a checkpoint file: :func:`read_checkpoint_bytes`, then :func:`decode_checkpoint`."""
    return decode_checkpoint(path, read_checkpoint_bytes(path))


def checkpoint_family(payload: Mapping, path: Path, family: str | None) -> str:
    """The network family a checkpoint holds: recorded by the module, else stated by the caller."""
    recorded = payload.get("network_family")
    if recorded is None and "network" in (payload.get("hyper_parameters") or {}):
        recorded = "segmentation"  # checkpoints written before families were recorded
    if family is not None and recorded is not None and family != recorded:
        raise DataError(f"{path}: holds a {recorded!r} network, expected a {family!r} one")
    name = family or recorded
    if name is None:
        raise DataError(f"{path}: checkpoint records no network architecture; state the network in the config")
    if name not in NETWORK_FAMILIES:
        raise DataError(f"{path}: unknown network family {name!r}; known: {', '.join(sorted(NETWORK_FAMILIES))}")
    return name


def load_network(path: str | Path, family: str | None = None, overrides: Mapping | None = None) -> nn.Module:
    """Rebuild the trained network stored in a checkpoint (:func:`build_network`).

    Args:
        path: a Lightning ``.ckpt``, a state dict (``.pt``/``.pth``) or ``.safetensors`` file, or a
            run directory (its newest ``best*.ckpt``).
        family, overrides: see :func:`build_network`.
    """
    path = resolve_checkpoint(path)
    return build_network(load_state(path), path, family, overrides)


def build_network(
    payload: Mapping, path: Path, family: str | None = None, overrides: Mapping | None = None
) -> nn.Module:
    """The network of a loaded checkpoint ``payload`` (read from ``path``, named in errors) with its
    weights (frozen, eval mode); weights or buffers with NaN/inf are refused, naming the file and the tensors.

    Args:
        family: the expected family (required for plain state dicts, checked against Lightning
            checkpoints).
        overrides: architecture options for checkpoints that carry no hyper-parameters
            (family-specific, e.g. ``{"network": "unet", "network_kwargs": {"width": 8}}``).
    """
    name = checkpoint_family(payload, path, family)
    spec = NETWORK_FAMILIES[name]
    try:
        net = spec.build(dict(payload.get("hyper_parameters") or {}), dict(overrides or {}))
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    state = payload["state_dict"]
    if any(k.startswith(spec.prefix) for k in state):
        state = {k[len(spec.prefix) :]: v for k, v in state.items() if k.startswith(spec.prefix)}
    raise_if_non_finite(state, str(path), "weights", "a diverged or damaged training; retrain it")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        summary = " ".join(str(err).split())[:300]
        raise DataError(
            f"{path}: checkpoint does not match the {name} network {dict(overrides or {})}: {summary}"
        ) from None
    return net.eval().requires_grad_(False)


def load_segmentation_network(
    path: str | Path, network: str | None = None, network_kwargs: dict | None = None
) -> nn.Module:
    """:func:`load_network` for segmentation networks (``network`` only for plain state dicts)."""
    overrides = {"network": network, "network_kwargs": network_kwargs or {}} if network else {}
    return load_network(path, family="segmentation", overrides=overrides)
