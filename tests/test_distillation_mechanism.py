"""Does distillation carry the task? On a tiny in-memory segmentation task (noisy disks):
a student that only sees a trained teacher's soft targets learns the task, and the ``learned``
gate of the adaptive student trusts a good teacher over a random one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.losses import weighted_sum
from distill.modules import MultiTeacherDistillModule, SegDistillModule, SegmentationModule

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no trainer here
SIZE = 32


def disks(count: int, seed: int) -> dict[str, torch.Tensor]:
    """(count, 3, 32, 32) noisy images of one bright disk each, with its (count, 32, 32) mask."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.rand(count, 2, generator=generator) * 16 + 8
    radius = torch.rand(count, generator=generator) * 4 + 4
    grid = torch.stack(torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")).float()
    distance = (grid[None] - centre[:, :, None, None]).norm(dim=1)
    label = (distance < radius[:, None, None]).long()
    image = label[:, None].float().expand(-1, 3, -1, -1) + 0.6 * torch.randn(count, 3, SIZE, SIZE, generator=generator)
    return {"image": image, "label": label}


def train(module, steps: int, seed: int, lr: float = 1e-2) -> None:
    """``steps`` Adam steps of ``module``'s weighted loss on fresh batches of 16 disks."""
    module.train()
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        batch = disks(16, seed * 1000 + step)
        loss = weighted_sum(module.loss_terms(batch, module.training_outputs(batch)), module.loss_weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def dice_on(network: torch.nn.Module, test: dict[str, torch.Tensor]) -> float:
    """Foreground Dice of ``network``'s argmax over the whole test set."""
    network.eval()
    pred = network(test["image"]).argmax(1)
    return (2 * (pred * test["label"]).sum() / (pred.sum() + test["label"].sum())).item()


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory) -> Path:
    """A width-8 slim U-Net trained with Dice + Lovasz on the disks, as a Lightning-style checkpoint."""
    torch.manual_seed(0)
    teacher = SegmentationModule(network="slim_unet", network_kwargs={"width": 8})
    train(teacher, 40, seed=1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    torch.save(
        {
            "state_dict": teacher.state_dict(),
            "hyper_parameters": dict(teacher.hparams),
            "network_family": "segmentation",
        },
        path,
    )
    return path


def test_a_kd_only_student_learns_the_task_from_its_teacher(trained_teacher):
    torch.manual_seed(0)
    student = SegDistillModule(
        teacher_checkpoint=str(trained_teacher), network_kwargs={"width": 4}, loss_weights={"kd": 1.0}
    )
    student.prepare_distillation()
    test = disks(32, seed=99)
    untrained = dice_on(student.net, test)
    train(student, 40, seed=2)  # never sees a label: the kd term alone
    teacher, distilled = dice_on(student.teachers.networks[0], test), dice_on(student.net, test)
    assert teacher > 0.8, f"teacher Dice {teacher:.3f}: the task was not learned"
    assert distilled >= 0.8 * teacher and distilled > untrained + 0.3, (untrained, distilled, teacher)


def test_the_learned_gate_trusts_the_good_teacher(tmp_path, trained_teacher):
    torch.manual_seed(3)
    random_teacher = tmp_path / "random.ckpt"
    # a random network (random output layer too): not the constant 1 % of the default prior
    untrained = SegmentationModule(network="slim_unet", network_kwargs={"width": 8}, foreground_prior=None)
    torch.save(
        {"state_dict": untrained.state_dict(), "hyper_parameters": dict(untrained.hparams)},
        random_teacher,
    )
    student = MultiTeacherDistillModule(
        teachers=[str(trained_teacher), str(random_teacher)],
        weighting="learned",
        network_kwargs={"width": 4},
        loss_weights={"dice": 1.0, "kd": 1.0, "gate": 1.0},
    )
    student.prepare_distillation()
    train(student, 30, seed=4)
    batch = disks(16, seed=98)
    with torch.no_grad():
        weights = student.teacher_weights(batch, student.training_outputs(batch))  # (K=2, B, H, W)
    assert weights[0].mean().item() > 0.8, weights.flatten(1).mean(1).tolist()
