"""Knowledge distillation for medical imaging, as Lightning experiments.

Layout: networks in ``distill.models``, loss math in ``distill.losses``, metrics in
``distill.metrics``, training logic in ``distill.modules`` (one LightningModule per method),
file formats shared with the data side in ``distill.formats``, entry points in ``distill.cli``.
LightningDataModules live in the sibling package ``data_modules``, which imports ``distill``;
``distill`` imports ``data_modules`` only from its entry points (``distill data ...``, ``distill demo``).
"""

__version__ = "0.1.0"
