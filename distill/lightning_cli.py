"""``distill fit|validate|test|predict --config X.yaml``: LightningCLI over any module/DataModule.

YAMLs use ``class_path``/``init_args`` for the model and data. What the data determines (input
channels, classes, class names) the DataModule states once and the CLI links
into the model (:mod:`distill.data_links`); other shared values use OmegaConf interpolation
(``${trainer.default_root_dir}``, ``${oc.env:PROSTATE_DATA,data/prostate}``), resolved after
command-line overrides.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pickle
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace, get_loader, set_loader, set_parsing_settings
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from distill.callbacks import FitCompletion, RandomStateCheckpoint, sigterm_note
from distill.data_links import DATA_TO_MODEL
from distill.errors import DataError
from distill.modules.finite import raise_if_non_finite
from distill.termination import stop_on_signal, stop_signal_name
from distill.utils import (
    atomic_write,
    load_yaml_text,
    read_extending_yaml,
    read_yaml,
    refuse_output_inside_inputs,
    unique_path,
)
from distill.wandb_logging import WandbResultPlots

# ``${product:a,b}``: YAMLs written before in_channels was linked from the data still parse
OmegaConf.register_new_resolver("product", lambda *factors: math.prod(int(f) for f in factors), replace=True)
PARSER_MODE = "omegaconf+"


def cap_yaml_aliases_of_the_parser(mode: str = PARSER_MODE) -> None:
    """Every YAML value LightningCLI reads in ``mode`` (``--config`` files, ``--key=value`` values) first
    passes the alias cap of :func:`distill.utils.load_yaml_text`, so an alias bomb is refused in one line
    instead of hanging the parser; jsonargparse's own loader then reads it as before."""
    probe = ArgumentParser(parser_mode=mode)  # jsonargparse sets a mode's loader on its first use
    probe.add_argument("--value")
    probe.parse_string("value: 1")
    jsonargparse_load = get_loader(mode)
    if getattr(jsonargparse_load, "alias_capped", False):
        return

    def load(value: str):
        load_yaml_text(value, "YAML value")
        return jsonargparse_load(value)

    load.alias_capped = True
    set_loader(mode, load, exceptions=(yaml.YAMLError,))


cap_yaml_aliases_of_the_parser()

# Model options that define the network's shape: a checkpoint must agree with the config on them.
ARCHITECTURE_KEYS = ("network", "network_kwargs", "in_channels", "num_classes", "backbone", "backbone_kwargs")
# those the data states (compared with a checkpoint once the model is built), and the others (at parsing)
LINKED_ARCHITECTURE_KEYS = tuple(key for key in ARCHITECTURE_KEYS if key in DATA_TO_MODEL.values())
CONFIGURED_ARCHITECTURE_KEYS = tuple(key for key in ARCHITECTURE_KEYS if key not in LINKED_ARCHITECTURE_KEYS)
EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")  # resolved by Lightning, not files


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, then renames it into place:
    a kill or a full disk never leaves a truncated ``best.ckpt`` / ``last.ckpt`` behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as temporary:
            torch.save(checkpoint, temporary)


def expand_config_files(args: list[str]) -> list[str]:
    """``args`` with each ``--config`` file that ``extends`` another replaced by its resolved YAML text
    (:func:`distill.utils.read_extending_yaml`: the base file, deep-updated by this one's keys).
    A ``--config`` file that is missing, not valid YAML or not a mapping is refused in one line naming
    the file (and line); a ``--config`` value holding YAML text itself (a line break or ``key: value``)
    is left to the parser."""
    expanded = list(args)
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            where, path = i + 1, Path(args[i + 1])
        elif arg.startswith("--config="):
            where, path = i, Path(arg.split("=", 1)[1])
        else:
            continue
        if "\n" in str(path) or (": " in str(path) and not path.is_file()):
            continue
        if "extends" in read_yaml(path, "config file"):
            text = yaml.safe_dump(read_extending_yaml(path, "config file"), sort_keys=False)
            expanded[where] = text if where == i + 1 else f"--config={text}"
    return expanded


def load_checkpoint_for_cli(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (read with ``weights_only=True``); any problem, NaN or inf weights
    included, is a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found (--ckpt_path)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines()]
        reason = (
            next((line for line in lines if "Unsupported global" in line), lines[0])
            .removeprefix("WeightsUnpickler error: ")
            .split(". Please")[0]
        )
        raise DataError(f"{path}: refused by weights_only loading, untrusted pickle content ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = " ".join(str(err).split()).split(". ")[0]
        raise DataError(
            f"{path}: not a readable checkpoint, truncated or corrupt ({type(err).__name__}: {reason})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DataError(f"{path}: not a Lightning checkpoint (no 'state_dict'; write one with `distill fit`)")
    raise_if_non_finite(checkpoint["state_dict"], str(path), "weights", "a diverged or damaged training; retrain it")
    return checkpoint


def architecture_differences(
    recorded: dict[str, Any], built: dict[str, Any], keys: tuple[str, ...] = ARCHITECTURE_KEYS
) -> list[str]:
    """``"key: checkpoint X, config Y"`` for the class and every architecture option of ``keys`` on
    which a checkpoint's hyper-parameters (``recorded``) and the model's (``built``: the config's
    ``init_args`` with its ``_class_path``, or the built model's ``hparams``) disagree."""
    differences = []
    if "_class_path" in recorded and built.get("_class_path") not in (None, recorded["_class_path"]):
        differences.append(f"class: checkpoint {recorded['_class_path']}, config {built['_class_path']}")
    for key in keys:
        if key in recorded and key in built and recorded[key] != built[key]:
            differences.append(f"{key}: checkpoint {recorded[key]!r}, config {built[key]!r}")
    return differences


def refuse_other_architecture(ckpt_path: str, differences: list[str]) -> None:
    if differences:
        raise DataError(f"{ckpt_path}: checkpoint architecture differs from the config ({'; '.join(differences)})")


def resume_differences(checkpoint: dict[str, Any], model_config: dict[str, Any]) -> list[str]:
    """``"key: checkpoint X, config Y"`` for each optimizer or schedule setting that resuming from
    ``checkpoint`` does not take from the config: the optimizer's ``init_args`` against the
    checkpoint's first parameter group (``lr``: its value before scheduling), ``lr_schedule`` and
    ``warmup_steps`` against its hyper-parameters."""
    configured = model_config.get("init_args") or {}
    recorded = checkpoint.get("hyper_parameters") or {}
    differences = [
        f"{key}: checkpoint {recorded[key]!r}, config {configured[key]!r}"
        for key in ("lr_schedule", "warmup_steps")
        if key in recorded and key in configured and recorded[key] != configured[key]
    ]
    optimizer = configured.get("optimizer")
    states = checkpoint.get("optimizer_states") or [{}]
    saved = (states[0].get("param_groups") or [{}])[0]
    for key, value in ((optimizer.get("init_args") or {}) if isinstance(optimizer, dict) else {}).items():
        old = saved.get("initial_lr", saved.get("lr")) if key == "lr" else saved.get(key)
        old, value = (list(v) if isinstance(v, tuple) else v for v in (old, value))  # betas: a tuple when saved
        if old is not None and value is not None and old != value:
            differences.append(f"{key}: checkpoint {old!r}, config {value!r}")
    return differences


# The keys whose classes are called with the parameters / the optimizer: they must name such classes.
CALLED_CLASS_BASES = {"optimizer": torch.optim.Optimizer, "lr_scheduler": torch.optim.lr_scheduler.LRScheduler}


def refuse_code_in_config(value: Any, key: str = "") -> None:
    """Refuse, before anything is instantiated, a parsed config that would call code other than a class:
    a ``class_path`` naming a function (``os.system``) or a function given as a value; and under an
    ``optimizer`` / ``lr_scheduler`` key, anything but a ``torch.optim`` optimizer / scheduler class.
    One-line :class:`DataError` naming the key."""
    if isinstance(value, Namespace):
        value = vars(value)
    if isinstance(value, dict):
        target = None
        if isinstance(value.get("class_path"), str):
            module, _, name = value["class_path"].rpartition(".")
            target = getattr(importlib.import_module(module), name, None) if module else None
            _refuse_called(target, value["class_path"], key)
        for child_key, child in value.items():
            refuse_code_in_config(child, f"{key}.{child_key}" if key else str(child_key))
    elif isinstance(value, (list, tuple)):
        for index, child in enumerate(value):
            refuse_code_in_config(child, f"{key}[{index}]")
    elif inspect.isroutine(value):  # a function or method; callable instances (e.g. parsed paths) are data
        _refuse_called(value, f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', value)}", key)


def _refuse_called(target: Any, name: str, key: str) -> None:
    if not inspect.isclass(target):
        raise DataError(f"{key}: {name} is not a class; a config names classes only, never a function to call")
    base = CALLED_CLASS_BASES.get(key.rpartition(".")[2])
    if base is not None and not issubclass(target, base):
        raise DataError(f"{key}: {name} is not a {base.__module__}.{base.__name__} class; only those may be named here")


def check_writable_dir(path: str | Path) -> None:
    """Refuse an output folder that cannot be created or written to, in one line. The probe file has a
    name of its own per call, so DDP ranks starting together do not race on it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise DataError(f"{path}: output folder not writable ({err.strerror or err})") from None


class SaveResolvedConfig(SaveConfigCallback):
    """Saves the resolved config of every run into its log directory without ever overwriting one.

    Lightning's own callback refuses to start when ``config.yaml`` already exists (every W&B
    sweep run after the first shares a save directory); this one writes ``config-1.yaml``,
    ``config-2.yaml``, ... instead, and also sends the config to the logger as hyper-parameters.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # ``trainer.log_dir`` is a collective under DDP: every rank asks, rank 0 alone saves.
        self.log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = self.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        path = unique_path(log_dir / self.config_filename)
        self.parser.save(self.config, str(path), skip_none=False, multifile=False)
        self.saved_path = path
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": self.config.as_dict()})


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad config as one line naming the key, instead of pages of usage text."""

    # jsonargparse's framing lines, and the alternative every optional class key shows: never the reason
    NOT_REASONS = (
        "Does not validate against any of the Union subtypes",
        "Subtypes:",
        "Errors:",
        "Given value type:",
        "Given value:",
        "Expected a <class 'NoneType'>",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})  # --trainer.max_epoch must not mean max_epochs

    def error(self, message: str, ex: Exception | None = None):
        lines = [line.strip(" -") for line in str(message).splitlines() if line.strip(" -")] or [str(message)]
        reason = next((line for line in lines[1:] if not line.startswith(self.NOT_REASONS)), None)
        summary = f"{lines[0]} {reason}" if reason else lines[0]
        prog = self.prog.replace(" [options]", "")
        sys.exit(f"error: {summary} (see `{prog} --help`)")


def builtin_numbers(value: Any) -> Any:
    """``value`` with every int/float subclass instance (jsonargparse restricted types) made a
    plain int/float; namespaces are changed in place."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, (int, float)):
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, Namespace):
        for key, item in vars(value).items():
            setattr(value, key, builtin_numbers(item))
        return value
    if isinstance(value, dict):
        return {key: builtin_numbers(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(builtin_numbers(item) for item in value)
    return value


@contextmanager
def plain_datamodule_str() -> Iterator[None]:
    """``str(datamodule)`` as the plain object name meanwhile. jsonargparse formats the DataModule
    into its message for each link it skips (an attribute the data does not state), and Lightning's
    ``LightningDataModule.__str__`` calls every loader method to report dataset sizes: it would read
    the whole dataset before the model is even built."""
    lightning_str = L.LightningDataModule.__str__
    L.LightningDataModule.__str__ = object.__str__
    try:
        yield
    finally:
        L.LightningDataModule.__str__ = lightning_str


class DistillCLI(LightningCLI):
    """LightningCLI with this project's defaults: any LightningModule/DataModule by class path."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.checkpoint_hparams: tuple[str, dict[str, Any]] | None = None  # --ckpt_path's, when a file
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
            parser_kwargs={"parser_mode": PARSER_MODE},
            seed_everything_default=0,
            auto_configure_optimizers=False,
            # added to the config's callbacks (result plots: only with a WandbLogger)
            trainer_defaults={"callbacks": [RandomStateCheckpoint(), FitCompletion(), WandbResultPlots()]},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--allow_random_weights",
            type=bool,
            default=False,
            help="validate/test/predict without --ckpt_path, i.e. on untrained weights (refused otherwise)",
        )
        for attribute, argument in DATA_TO_MODEL.items():  # the data states them, the model takes them
            parser.link_arguments(f"data.{attribute}", f"model.init_args.{argument}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then refuse before any work: bad YAML, a bad ``--ckpt_path`` (missing, not a
        checkpoint, refused pickle, truncated, non-finite weights, another architecture than the
        config's), a config that names code to call (:func:`refuse_code_in_config`), evaluation without
        a checkpoint, an output folder that cannot be written or lies inside the data folder."""
        expanded = expand_config_files(list(sys.argv[1:] if args is None else args))
        with warnings.catch_warnings():
            if args is None:  # the command line itself, its --config files expanded: not a second command line
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, expanded)
        refuse_code_in_config(self.config)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is not None and str(ckpt_path) not in SPECIAL_CKPT_PATHS:
            checkpoint = load_checkpoint_for_cli(ckpt_path)
            self.checkpoint_hparams = (ckpt_path, checkpoint.get("hyper_parameters") or {})
            model = config.get("model")
            model = model.as_dict() if hasattr(model, "as_dict") else model or {}
            configured = {"_class_path": model.get("class_path"), **(model.get("init_args") or {})}
            refuse_other_architecture(
                ckpt_path,
                architecture_differences(self.checkpoint_hparams[1], configured, CONFIGURED_ARCHITECTURE_KEYS),
            )
            changed = resume_differences(checkpoint, model)
            if subcommand == "fit" and changed:
                print(
                    f"warning: {ckpt_path}: resuming keeps the checkpoint's optimizer state, so these config "
                    f"changes do not apply ({'; '.join(changed)})",
                    file=sys.stderr,
                    flush=True,
                )
        elif ckpt_path is None and subcommand in EVALUATION_SUBCOMMANDS and not config.get("allow_random_weights"):
            raise DataError(
                f"{subcommand}: no --ckpt_path, so the model would have untrained weights; "
                "pass --ckpt_path=PATH (or --allow_random_weights=true)"
            )
        root = (config.get("trainer") or {}).get("default_root_dir")
        if root is not None:
            data = config.get("data")
            data_args = (data.get("init_args") if isinstance(data, (dict, Namespace)) else None) or {}
            refuse_output_inside_inputs(root, data_args, "trainer.default_root_dir")
            check_writable_dir(root)

    def before_instantiate_classes(self) -> None:
        """Constrained values (``PositiveInt``...) become plain numbers before they reach the
        modules, so hyper-parameters stay readable by ``torch.load(weights_only=True)`` and YAML."""
        builtin_numbers(self.config)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, with checkpoints written atomically (:class:`AtomicCheckpointIO`) unless the
        config chose its own checkpoint IO; a value Lightning refuses (``max_epochs=-5``) is one line."""
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:
            raise DataError(f"trainer: {' '.join(str(err).split())}") from None
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def instantiate_classes(self) -> None:
        """Build the data, then the model with the data's linked values; refuse a ``--ckpt_path`` whose
        linked values (input channels, classes) differ from the data's, and a config value the data
        overrides."""
        with plain_datamodule_str():
            super().instantiate_classes()
        if self.checkpoint_hparams is not None:
            ckpt_path, recorded = self.checkpoint_hparams
            built = dict(self.model.hparams)
            refuse_other_architecture(ckpt_path, architecture_differences(recorded, built, LINKED_ARCHITECTURE_KEYS))
        self.refuse_values_the_data_overrides()

    def refuse_values_the_data_overrides(self) -> None:
        """A model value the config sets (not the signature's default) that the data's linked value
        replaced and that differs from it: one line, not a silently different model."""
        configured = (self._get(self.config, "model") or {}).get("init_args") or {}
        defaults = inspect.signature(type(self.model).__init__).parameters
        for argument in DATA_TO_MODEL.values():
            if argument not in configured or argument not in defaults or argument not in self.model.hparams:
                continue
            given, linked = configured[argument], self.model.hparams[argument]
            if given != defaults[argument].default and given != linked:
                raise DataError(
                    f"model.init_args.{argument}={given!r}: the data states {linked!r}; leave it out, "
                    "distill links it from the data"
                )

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; stopped by SIGTERM or Ctrl-C: :class:`~distill.errors.Terminated` saying where, and which
        ``last.ckpt`` to resume from (:class:`~distill.callbacks.FitCompletion` wrote it)."""
        with stop_on_signal(
            lambda: f"{subcommand}: interrupted by {stop_signal_name()}{sigterm_note(self.trainer, resume_hint=True)}"
        ):
            super()._run_subcommand(subcommand)


def run_lightning_cli(argv: list[str]) -> None:
    """Run LightningCLI on ``argv``; from the shell it reads ``sys.argv`` itself (passing both makes it warn)."""
    DistillCLI(args=None if argv == sys.argv[1:] else argv)
