"""What a DataModule tells the model: values stated once, by the data, and linked into the model.

``distill fit|validate|test|predict`` links each attribute of :data:`DATA_TO_MODEL` that the
DataModule has into the model argument of the same meaning (LightningCLI
``link_arguments(..., apply_on="instantiate")``): the data is built first, then the model with
those values. A YAML never writes them twice; a model without the argument (a MoCo model has no
``in_channels``) or a DataModule without the attribute simply does not take part, and the
model's own value stands.

A DataModule of your own joins by stating the attributes that fit its task, as plain
attributes or properties, readable right after ``__init__`` (:class:`SegmentationData`,
:class:`PhaseData`). Values known only after ``setup`` (the sites of the cases read, the width
of feature files) are read by the module in its own ``setup`` through the same protocols.

Example: a segmentation DataModule of two MRI channels and three stacked slices states
``in_channels = 6``, ``num_classes = 3``, ``class_names = ["PZ", "TZ"]``; the student
YAML then names only its network.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

# data attribute -> model ``init_args`` key it fills
DATA_TO_MODEL: dict[str, str] = {
    "in_channels": "in_channels",
    "num_classes": "num_classes",
    "class_names": "class_names",
}


@runtime_checkable
class SegmentationData(Protocol):
    """A DataModule of 2D / 2.5D segmentation batches ``{"image": (B, in_channels, H, W), "label": (B, H, W)}``.

    Attributes:
        in_channels: network input channels (MRI channels x stacked slices).
        num_classes: background + foreground classes.
        class_names: the foreground classes' names, in label order (``num_classes - 1`` names).
        image_size: training slice side (H = W), the exported network's input size.
        site_names: sites of the cases read, for per-site metrics (after ``setup``).
    """

    in_channels: int
    num_classes: int
    class_names: list[str]
    image_size: int
    site_names: list[str]


@runtime_checkable
class PhaseData(Protocol):
    """A DataModule of surgical frames or feature sequences labelled with phases.

    Attributes:
        dataset: the phase vocabulary and evaluation protocol (``"cholec80"``, ``"m2cai16"``); a YAML
            passes it to a model that needs it as ``${data.init_args.dataset}`` (the pre-training and
            fine-tuning modules forward unknown arguments, so a link cannot tell whether they take it).
        num_classes: the dataset's number of phases.
        image_size: frame side (H = W) a network sees; feature DataModules state None.
    """

    dataset: str
    num_classes: int
    image_size: int | None
