"""``distill fit|validate|test|predict --config X.yaml``: LightningCLI over any module/DataModule.

YAMLs use ``class_path``/``init_args`` for the model and data, and OmegaConf interpolation
(``${data.init_args.num_slices}``, ``${oc.env:PROSTATE_DATA,data/prostate}``) resolved after
command-line overrides, so derived values are linked rather than repeated.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from distill.utils import unique_path


class SaveResolvedConfig(SaveConfigCallback):
    """Saves the resolved config of every run into its log directory without ever overwriting one.

    Lightning's own callback refuses to start when ``config.yaml`` already exists (every W&B
    sweep run after the first shares a save directory); this one writes ``config-1.yaml``,
    ``config-2.yaml``, ... instead, and also sends the config to the logger as hyper-parameters.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        path = unique_path(log_dir / self.config_filename)
        self.parser.save(self.config, str(path), skip_none=False, multifile=False)
        self.saved_path = path
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.config.as_dict()})


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad config as one line naming the key, instead of pages of usage text."""

    REASONS = ("is not accepted", "is not expected", "nrecognized argument", "does not exist", "not found", "Expected a")

    def error(self, message: str, ex: Exception | None = None):
        lines = [line.strip(" -") for line in str(message).splitlines() if line.strip(" -")]
        reason = next((line for line in lines[1:] for r in self.REASONS if r in line), None)
        summary = f"{lines[0]} {reason}" if reason and reason != lines[0] else (lines[0] if lines else message)
        prog = self.prog.replace(" [options]", "")
        sys.exit(f"error: {summary} (see `{prog} --help`)")


class DistillCLI(LightningCLI):
    """LightningCLI with this project's defaults: any LightningModule/DataModule by class path."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        # ``${trainer.x}`` in a YAML means that file's own ``trainer.x`` both under a subcommand
        # (``fit.trainer.x``) and without one (tables): rewrite such paths as relative ones.
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=OneLineErrorParser,
            save_config_callback=SaveResolvedConfig,
            parser_kwargs={"parser_mode": "omegaconf+"},
            seed_everything_default=0,
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )


def run_lightning_cli(argv: list[str]) -> None:
    """Run LightningCLI on ``argv``; from the shell it reads ``sys.argv`` itself (passing both makes it warn)."""
    DistillCLI(args=None if argv == sys.argv[1:] else argv)
