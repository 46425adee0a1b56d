"""Weights & Biases: offline unless an API key is configured, run labels for table rows, result plots.

Any experiment YAML logs to W&B by listing a ``WandbLogger`` (next to the CSV logger, which tables
read), e.g.::

    trainer:
      logger:
        - class_path: lightning.pytorch.loggers.CSVLogger
          init_args: {save_dir: "${trainer.default_root_dir}"}
        - class_path: lightning.pytorch.loggers.WandbLogger
          init_args: {project: distill, save_dir: "${trainer.default_root_dir}", tags: [prostate, kd]}

Without a key (``WANDB_API_KEY``, or an ``api.wandb.ai`` entry in ``~/.netrc``) and without
``WANDB_MODE``, ``distill`` sets ``WANDB_MODE=offline``: runs are written under
``<save_dir>/wandb/offline-run-*`` and uploaded later with ``wandb sync``. The resolved config is
logged as hyper-parameters (:class:`distill.lightning_cli.SaveResolvedConfig`), every logged metric
(per-site Dice, phase metrics) goes to W&B as to any logger, and :class:`WandbResultPlots` adds
the result figures. ``distill table`` names each W&B run ``<row>/seed_<s>`` in the group
``<table title slug>`` unless the YAML sets ``name`` / ``group``.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger


def wandb_key_configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether W&B has an API key: ``WANDB_API_KEY`` or a ``~/.netrc`` entry for the W&B host."""
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def default_wandb_offline(environ: os._Environ | dict = os.environ) -> None:
    """``WANDB_MODE=offline`` when neither ``WANDB_MODE`` nor an API key is set (W&B would prompt)."""
    if "WANDB_MODE" not in environ and not wandb_key_configured(environ):
        environ["WANDB_MODE"] = "offline"


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def label_wandb_runs(trainer: L.Trainer, group: str, name: str) -> None:
    """Group and name the W&B runs of ``trainer`` not started yet, unless the config set them.

    (``WandbLogger`` passes its ``_wandb_init`` to ``wandb.init`` when the run first starts.)
    """
    for logger in wandb_loggers(trainer):
        if logger._experiment is None:
            logger._wandb_init["group"] = logger._wandb_init.get("group") or group
            logger._wandb_init["name"] = logger._name = logger._wandb_init.get("name") or name


def finish_wandb_runs(trainer: L.Trainer) -> None:
    """End the W&B runs of ``trainer``: the next run of a table starts its own instead of reusing it."""
    for logger in wandb_loggers(trainer):
        if logger._experiment is not None:
            logger.experiment.finish()


class WandbResultPlots(Callback):
    """After testing, logs result figures to every W&B logger of the run (nothing without one):

    - ``test/dice_per_site``: bars of the logged ``test/dice/<site>`` values (:func:`~distill.plotting.site_dice_bars`);
    - ``test/phase_ribbons/<video>``: ground truth vs prediction of each test video, for modules that
      keep ``videos`` = {name: (frames, ground truth, prediction)} (:class:`~distill.modules.TCNPhaseModule`).
    """

    def __init__(self, dice_key: str = "test/dice", max_videos: int = 8) -> None:
        self.dice_key = dice_key
        self.max_videos = max_videos

    def figures(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        from distill.plotting import phase_ribbons, site_dice_bars

        figures = {}
        prefix = self.dice_key + "/"
        sites = {
            k[len(prefix) :]: (float(v), 0.0)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(prefix) and "/" not in k[len(prefix) :]
        }
        if sites:
            figures["test/dice_per_site"] = site_dice_bars({pl_module.__class__.__name__: sites})
        videos = getattr(pl_module, "videos", None)
        if isinstance(videos, dict) and videos:
            from distill.formats.phases import phase_names

            names = phase_names(pl_module.hparams.get("dataset", "cholec80"))
            for video, (_, truth, prediction) in sorted(videos.items())[: self.max_videos]:
                figures[f"test/phase_ribbons/{video}"] = phase_ribbons(
                    {"ground truth": truth, "prediction": prediction}, names, title=video
                )
        return figures

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        import wandb

        images = {key: wandb.Image(figure) for key, figure in self.figures(trainer, pl_module).items()}
        for logger in loggers:
            if images:
                logger.experiment.log(images)
