"""Every network family a checkpoint can hold, listed in one place.

A family says how to rebuild its architecture from a checkpoint's hyper-parameters; a Lightning
module records its family in the checkpoint (``checkpoint["network_family"]``, the module's
``network_family``), so :func:`distill.modules.checkpoints.load_network` rebuilds any trained
network without the experiment's config. A new family is one build function and one entry in
:data:`NETWORK_FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from distill.errors import DataError
from distill.models import build_moco_encoder, build_segmentation_network
from distill.models.backbones import build_frame_classifier


@dataclass(frozen=True)
class NetworkFamily:
    """How to rebuild one family of networks from a checkpoint.

    Attributes:
        build: ``(hparams, overrides) -> nn.Module``; ``hparams`` are the checkpoint's
            hyper-parameters, ``overrides`` what the caller states for plain state dicts.
        prefix: key prefix of the network's weights in a Lightning ``state_dict`` (``"net."``).
    """

    build: Callable[[Mapping, Mapping], nn.Module]
    prefix: str


def build_segmentation(hparams: Mapping, overrides: Mapping) -> nn.Module:
    """Segmentation networks: ``network``, ``network_kwargs``, ``in_channels``, ``num_classes``."""
    name = overrides.get("network") or hparams.get("network")
    if name is None:
        raise DataError("checkpoint records no network architecture; set teacher_network in the config")
    kwargs = dict((overrides.get("network_kwargs") if "network" in overrides else hparams.get("network_kwargs")) or {})
    in_channels = kwargs.pop("in_channels", hparams.get("in_channels", 3))
    num_classes = kwargs.pop("num_classes", hparams.get("num_classes", 2))
    return build_segmentation_network(name, in_channels=in_channels, num_classes=num_classes, **kwargs)


def build_moco(hparams: Mapping, overrides: Mapping) -> nn.Module:
    """The query encoder of a MoCo checkpoint (``backbone``, ``backbone_source``, ``proj_*`` options)."""
    options = {**hparams, **overrides}
    if "backbone" not in options:
        raise DataError(
            "checkpoint records no backbone; state it (overrides {'backbone': ...}) or use a MoCo run's checkpoint"
        )
    return build_moco_encoder(
        options["backbone"],
        options.get("backbone_source", "timm"),
        int(options.get("proj_hidden_dim", 2048)),
        int(options.get("proj_dim", 128)),
        proj_batch_norm=bool(options.get("proj_batch_norm", False)),
    )


def build_phase_classifier(hparams: Mapping, overrides: Mapping) -> nn.Module:
    """The frame classifier of a phase-classifier checkpoint (``backbone``, ``backbone_source``,
    ``num_classes``); its weights come from the checkpoint, not a teacher."""
    options = {**hparams, **overrides}
    if "backbone" not in options:
        raise DataError(
            "checkpoint records no backbone; state it (overrides {'backbone': ...}) or use a phase classifier's checkpoint"
        )
    return build_frame_classifier(
        options["backbone"], int(options.get("num_classes", 7)), source=options.get("backbone_source", "timm")
    )


#: Family name (a module's ``network_family``) -> how to rebuild it.
NETWORK_FAMILIES: dict[str, NetworkFamily] = {
    "segmentation": NetworkFamily(build_segmentation, prefix="net."),
    "moco": NetworkFamily(build_moco, prefix="encoder_q."),
    "phase_classifier": NetworkFamily(build_phase_classifier, prefix=""),
}
