"""The GPU presets (experiments/*/gpu/*.yaml) train on a CPU too: one step each, the trained network
compiled through torch.compile (backend ``eager``: TorchDynamo's graph capture, as on a GPU, run by
eager kernels, so no C++ compiler is needed), bf16 autocast, NHWC and the float32 matmul setting in
effect.
(That every preset builds as written: tests/test_experiments.py.)"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import QUIET, TINY

from distill.lightning_cli import DistillCLI

REPO = Path(__file__).resolve().parents[1]
ONE_STEP = [
    "--model.init_args.compile_backend=eager",
    "--trainer.max_steps=1",
    "--trainer.limit_val_batches=0",
    *QUIET,
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code of one test stays out of the next (TorchDynamo caches per process)."""
    yield
    torch._dynamo.reset()


def train_one_step(preset: str, tmp_path: Path, *overrides: str) -> DistillCLI:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = DistillCLI(
            args=[
                "--config",
                str(REPO / "experiments" / preset),
                *overrides,
                *ONE_STEP,
                f"--trainer.default_root_dir={tmp_path}",
            ],
            run=False,
        )
    precision = torch.get_float32_matmul_precision()
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(precision)
    assert cli.trainer.global_step == 1 and cli.trainer.precision == "bf16-mixed"
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    return cli


def compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_the_prostate_teacher_preset_trains_with_the_network_compiled(synthetic_prostate_root, tmp_path):
    cli = train_one_step(
        "prostate/gpu/teacher.yaml",
        tmp_path,
        f"--data.init_args.data_root={synthetic_prostate_root}",
        *TINY,
        "--model.init_args.compile=true",  # off in the preset (inductor fails on the U-Net's backward), on here
    )
    assert compiled(cli.model.net)
    assert all(
        name.startswith("net.") and "_orig_mod" not in name for name in cli.model.state_dict()
    )  # checkpoints as before
    kernel = next(p for p in cli.model.net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1)
    assert kernel.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("preset", ["surgical/gpu/moco.yaml"])
def test_the_moco_preset_trains_a_compiled_query_encoder(synthetic_cholec80, tmp_path, monkeypatch, preset):
    monkeypatch.setenv("CHOLEC80_FRAMES", str(synthetic_cholec80.frames))
    monkeypatch.setenv("CHOLEC80_DATA", str(synthetic_cholec80.root))
    cli = train_one_step(
        preset,
        tmp_path,
        "--model.init_args.backbone=test_efficientnet",
        "--model.init_args.proj_hidden_dim=32",
        "--model.init_args.proj_dim=16",
        "--model.init_args.queue_size=16",
        "--data.init_args.image_size=32",
        "--data.init_args.resize_size=36",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--data.init_args.fps=5",
    )
    assert compiled(cli.model.encoder_q) and not compiled(cli.model.encoder_k)  # the EMA copy stays eager
