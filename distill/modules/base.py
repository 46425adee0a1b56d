"""Shared base of every LightningModule here: the training-step and evaluation templates, named
weighted loss terms, optimiser injection with parameter groups, the LR schedule, ``channels_last``
and the hyper-parameters.

A method subclasses :class:`DistillModuleBase` and fills in its hooks::

    class MyMethod(DistillModuleBase):
        loss_term_names = ("ce", "kd")             # what loss_weights may name
        default_loss_weights = {"ce": 1.0, "kd": 1.0}
        progress_bar_metrics = ("acc",)

        def __init__(self, num_classes: int = 7, **kwargs):  # shared options: DistillModuleBase's
            super().__init__(**kwargs)
            self.init_evaluation_metrics(lambda: MetricCollection({"acc": MulticlassAccuracy(num_classes)}))

        def training_outputs(self, batch): ...     # the method's forward pass on a batch
        def loss_terms(self, batch, outputs): ...  # {"ce": scalar, "kd": scalar}
        def evaluation_outputs(self, batch): ...   # (logits, labels): the metric's update arguments

and inherits ``training_step`` (weighted sum + logging of every term as ``train/<name>``; a
NaN/inf loss stops the run, naming the terms and outputs, and no checkpoint is written with
non-finite weights: :mod:`distill.modules.finite`),
``validation_step`` / ``test_step`` (the metric's results logged as ``val/<name>`` and
``test/<name>`` alike) and ``save_hyperparameters`` over every constructor argument but the
optimiser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from distill.errors import DataError
from distill.losses import check_loss_weights, weighted_sum
from distill.modules.finite import NonFiniteLossWatch, raise_if_non_finite
from distill.types import NonNegativeFloat, NonNegativeInt, PositiveInt


def check_optimizer_settings(optimizer: OptimizerCallable, owner: str) -> None:
    """Build ``optimizer`` on a stand-in parameter, so settings it refuses (a negative ``lr``, ``weight_decay``,
    ``momentum``, ``eps``, ``betas`` out of [0, 1)) or an ``lr`` of 0 fail at construction, in one line."""
    try:
        probe = optimizer([nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise DataError(
            f"{owner}: optimizer refuses its settings (model.init_args.optimizer.init_args): {err}"
        ) from None
    if float(probe.defaults.get("lr", 1.0)) == 0:
        raise DataError(f"{owner}: optimizer lr is 0, so nothing would be trained; set optimizer.init_args.lr > 0")


#: Non-finite training losses in a row that a gradient scaler may skip (each halves its scale: 25 is
#: a factor 3e7) before the run is stopped; without a scaler the first one stops it.
SCALER_SKIPS_TOLERATED = 25


class DistillModuleBase(L.LightningModule):
    """Owns what every method configures the same way; subclasses take these as ``**kwargs``.

    Args:
        loss_weights: weight per named loss term (``None``: the class's ``default_loss_weights``);
            a name the method does not compute fails at construction.
        optimizer: a callable ``params -> Optimizer``; in YAML ``class_path: torch.optim.AdamW``
            with ``init_args: {lr: ...}`` (LightningCLI dependency injection). It receives the
            parameter groups of :meth:`parameter_groups`.
        lr_schedule: ``"cosine"`` decays the LR per step to 0 over the whole run (length taken
            from the trainer, so it follows ``max_epochs`` without being repeated), with
            ``warmup_steps`` of linear warm-up; ``"constant"`` keeps it.
        channels_last: run convolutions in NHWC memory format (faster with mixed precision on
            GPUs and with oneDNN on CPUs). Mixed precision itself is ``trainer.precision``.
        finite_check_every: read the device-side record of non-finite losses every this many
            training steps (and at epoch end), the only host sync it costs; ``None``: the
            trainer's ``log_every_n_steps``, so a NaN stops the run within one logging interval.
        compile: ``torch.compile`` the method's trained network (:attr:`compiled_modules`) in place,
            when the trainer builds the model: parameter names, and so checkpoints, stay as they are.
            ``compile_backend``: torch.compile's backend (``"inductor"``; ``"aot_eager"`` on a CPU
            without a compiler).
        float32_matmul_precision: ``torch.set_float32_matmul_precision`` for the run: ``"high"``
            lets float32 matrix products use TF32 on Ampere and newer GPUs; None leaves torch's.
    """

    #: Loss terms this method can compute; ``loss_weights`` may only name these.
    loss_term_names: ClassVar[tuple[str, ...]] = ()
    #: Weights used when the config gives none.
    default_loss_weights: ClassVar[Mapping[str, float]] = {}
    #: Family of :meth:`deployable_network` in :mod:`distill.modules.checkpoints`, recorded in
    #: every checkpoint so ``load_network`` can rebuild it without the experiment's config.
    network_family: ClassVar[str | None] = None
    #: Results of the evaluation metric also shown in the progress bar.
    progress_bar_metrics: ClassVar[tuple[str, ...]] = ()
    #: Submodules that ``compile: true`` compiles: the networks trained (not teachers or EMA copies).
    compiled_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        loss_weights: Mapping[str, NonNegativeFloat] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: NonNegativeInt = 0,
        channels_last: bool = False,
        finite_check_every: PositiveInt | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        float32_matmul_precision: Literal["highest", "high", "medium"] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])  # collects the arguments of every subclass too
        self.loss_weights = dict(loss_weights if loss_weights is not None else self.default_loss_weights)
        check_loss_weights(self.loss_weights, self.loss_term_names, owner=type(self).__name__)
        if not any(weight > 0 for weight in self.loss_weights.values()):
            raise DataError(
                f"{type(self).__name__}: every loss weight is 0 ({self.loss_weights or 'none given'}), so nothing "
                "would be trained; give at least one term of loss_weights a weight > 0"
            )
        check_optimizer_settings(optimizer, owner=type(self).__name__)
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.channels_last = channels_last
        self.finite_check_every = finite_check_every
        self.non_finite_watch = NonFiniteLossWatch()

    def configure_model(self) -> None:
        """The GPU switches, once the trainer builds the model (before the weights move and DDP wraps
        it): ``float32_matmul_precision``, then ``compile`` of each module of :attr:`compiled_modules`."""
        if self.hparams.float32_matmul_precision is not None:
            torch.set_float32_matmul_precision(self.hparams.float32_matmul_precision)
        if self.hparams.compile:
            for name in self.compiled_modules:
                module = self.get_submodule(name)
                if getattr(module, "_compiled_call_impl", None) is None:  # validate after fit: once
                    module.compile(backend=self.hparams.compile_backend)

    def to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    # ------------------------------------------------------------ method hooks
    def training_outputs(self, batch: Any) -> Any:
        """The method's forward pass on a training batch (whatever :meth:`loss_terms` needs)."""
        raise NotImplementedError

    def loss_terms(self, batch: Any, outputs: Any) -> dict[str, torch.Tensor]:
        """Named scalar loss terms of one batch; only the weighted ones enter the loss."""
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        """Samples in a batch, for logging (default: first dimension of ``batch["image"]``)."""
        return int(batch["image"].shape[0])

    def parameter_groups(self) -> list[dict]:
        """Optimiser parameter groups (default: every trainable parameter in one group).

        Override to give a part its own options, e.g. ``{"params": probe, "lr": 0.1,
        "weight_decay": 0.0}`` for an online linear probe.
        """
        return [{"params": self.trainable_parameters(self)}]

    @staticmethod
    def trainable_parameters(module: nn.Module, exclude: Iterable[nn.Module] = ()) -> list[nn.Parameter]:
        """Parameters of ``module`` that require gradients, minus those of ``exclude``."""
        excluded = {id(p) for m in exclude for p in m.parameters()}
        return [p for p in module.parameters() if p.requires_grad and id(p) not in excluded]

    def evaluation_outputs(self, batch: Any) -> tuple:
        """The method's forward pass on a validation/test batch: the arguments of its metric's ``update``."""
        raise NotImplementedError

    def init_evaluation_metrics(self, build: Callable[[], nn.Module]) -> None:
        """``val_metrics`` and ``test_metrics``: two fresh metrics from ``build``, each with
        ``update(*evaluation_outputs(batch))``, ``compute() -> {name: value}`` and ``reset()``
        (e.g. a torchmetrics ``MetricCollection``; under DDP ``compute`` gathers every rank)."""
        self.val_metrics, self.test_metrics = build(), build()

    # ------------------------------------------------------------ the templates
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        outputs = self.training_outputs(batch)
        terms = self.loss_terms(batch, outputs)
        loss = weighted_sum(terms, self.loss_weights, owner=type(self).__name__)
        self.non_finite_watch.update(loss, terms, outputs, self.global_step)
        every = self.finite_check_every or self.trainer.log_every_n_steps
        if batch_idx % every == every - 1:
            self.check_finite_loss()
        batch_size = self.batch_size(batch)
        self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()}, batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.after_loss(batch, outputs)
        return loss

    def after_loss(self, batch: Any, outputs: Mapping[str, torch.Tensor]) -> None:
        """The last step of :meth:`training_step`, after the batch's loss: state that the batch's
        outputs update (MoCo: its keys enter the queue). Nothing by default."""

    def on_train_epoch_end(self) -> None:
        self.check_finite_loss()

    def check_finite_loss(self) -> None:
        """Stop the run if the loss went non-finite since the last check (:class:`NonFiniteLossWatch`);
        with a gradient scaler (``16-mixed``), only after more than :data:`SCALER_SKIPS_TOLERATED`
        non-finite steps in a row: single ones are overflows the scaler skips."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        tolerated = SCALER_SKIPS_TOLERATED if scaler is not None else 0
        self.non_finite_watch.check(self.current_epoch, self.global_step, tolerated)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_metrics.update(*self.evaluation_outputs(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.test_metrics.update(*self.evaluation_outputs(batch))

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test", self.test_metrics)

    def log_evaluation(self, stage: str, metrics: nn.Module) -> None:
        """Log every result of ``metrics`` as ``<stage>/<name>``, then reset it for the next epoch."""
        for name, value in metrics.compute().items():
            self.log(f"{stage}/{name}", torch.as_tensor(value).float(), prog_bar=name in self.progress_bar_metrics)
        metrics.reset()

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([group for group in self.parameter_groups() if group["params"]])
        if self.lr_schedule == "constant":
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.warmup_steps

        def cosine_with_warmup(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        raise_if_non_finite(
            checkpoint["state_dict"],
            f"training stopped at epoch {self.current_epoch}, step {self.global_step}",
            "weights or buffers",
            "the model diverged; this checkpoint is not written: lower the learning rate",
        )
        if self.network_family is not None:
            checkpoint["network_family"] = self.network_family

    # ------------------------------------------------------- results tables
    def deployable_network(self) -> nn.Module:
        """The network a user ships (no teachers, heads or probes); tables count and time it."""
        raise NotImplementedError

    def example_input_shape(self, datamodule: L.LightningDataModule) -> tuple[int, ...]:
        """Shape of one inference input of :meth:`deployable_network` for ``datamodule``'s data
        (latency measurements)."""
        raise NotImplementedError
