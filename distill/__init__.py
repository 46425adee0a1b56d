"""Knowledge distillation for medical imaging, as Lightning experiments.

Layout: networks in ``distill.models``, loss math in ``distill.losses``, metrics in
``distill.metrics``, training logic in ``distill.modules`` (one LightningModule per method),
entry points in ``distill.cli``. LightningDataModules live in the sibling package ``data_modules``.
"""

__version__ = "0.1.0"
