"""Procedure 2: weighting rules (hand-computed), batched frozen teachers, the multi-teacher module,
the teacher-output cache, limit-trained teachers and their manifest, and their bad inputs."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUIET, TINY

from distill.cli import main
from distill.errors import DataError
from distill.limit_trained import teacher_subsets
from distill.losses import pixel_kl_divergence
from distill.losses.multi_teacher import combine_soft_targets, gate_nll_loss, soft_target_kl, teacher_weights
from distill.models import FeatureTaps, build_segmentation_network
from distill.modules import FrozenTeachers, MultiTeacherDistillModule
from distill.modules.checkpoints import file_sha256

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [*TINY, *QUIET]

# Two teachers on one pixel: A is undecided, B says class 0 with probability 3/4.
LOGITS_A, LOGITS_B = [0.0, 0.0], [math.log(3.0), 0.0]


def two_teachers(*pixels) -> torch.Tensor:
    """(K=2, B=1, C=2, H=1, W=len(pixels)) from per-pixel (teacher A, teacher B) logit pairs."""
    a = torch.tensor([p[0] for p in pixels]).T  # (C, W)
    b = torch.tensor([p[1] for p in pixels]).T
    return torch.stack([a, b])[:, None, :, None, :]


def test_weighting_rules_match_hand_computed_weights():
    logits = two_teachers((LOGITS_A, LOGITS_B))
    label = torch.zeros(1, 1, 1, dtype=torch.long)
    assert teacher_weights("mean", logits).flatten().tolist() == [0.5, 0.5]
    # confidence: entropies ln 2 and -(3/4 ln 3/4 + 1/4 ln 1/4); weights softmax(-H)
    h_a, h_b = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    w_a = math.exp(-h_a) / (math.exp(-h_a) + math.exp(-h_b))
    assert teacher_weights("confidence", logits).flatten().tolist() == pytest.approx([w_a, 1 - w_a], abs=1e-6)
    # performance (CA-MKD): CE ln 2 and ln 4/3 -> softmax [0.6, 0.4] -> (1 - s) / (K - 1) = [0.4, 0.6]
    assert teacher_weights("performance", logits, label).flatten().tolist() == pytest.approx([0.4, 0.6], abs=1e-6)
    # learned: softmax of the gate logits over teachers
    gate = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    assert teacher_weights("learned", logits, gate_logits=gate).flatten().tolist() == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError, match="unknown teacher weighting rule 'majority'; available: mean, confidence"):
        teacher_weights("majority", logits)


def test_sample_granularity_averages_over_pixels():
    # pixel 0 as above, pixel 1 with the teachers swapped: per image the two teachers tie.
    logits = two_teachers((LOGITS_A, LOGITS_B), (LOGITS_B, LOGITS_A))
    label = torch.zeros(1, 1, 2, dtype=torch.long)
    per_pixel = teacher_weights("performance", logits, label)
    assert per_pixel[0, 0, 0].tolist() == pytest.approx([0.4, 0.6], abs=1e-6)
    per_image = teacher_weights("performance", logits, label, granularity="sample")
    assert per_image.flatten().tolist() == pytest.approx([0.5] * 4, abs=1e-6)


def test_mixture_target_kl_and_gate_loss_by_hand():
    logits = two_teachers((LOGITS_A, LOGITS_B))
    weights = torch.tensor([0.4, 0.6]).view(2, 1, 1, 1)
    target = combine_soft_targets(logits, weights, temperature=1.0)
    assert target.flatten().tolist() == pytest.approx([0.4 * 0.5 + 0.6 * 0.75, 0.4 * 0.5 + 0.6 * 0.25])
    student = torch.tensor([0.0, math.log(0.35 / 0.65)]).view(1, 2, 1, 1)  # exactly the mixture
    assert soft_target_kl(student, target, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    label = torch.zeros(1, 1, 1, dtype=torch.long)
    assert gate_nll_loss(logits, weights, label).item() == pytest.approx(-math.log(0.65), abs=1e-6)
    # With one teacher, the mixture KL is Hinton KD.
    s, t = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    one = combine_soft_targets(t[None], torch.ones(1, 2, 4, 4), 4.0)
    assert soft_target_kl(s, one, 4.0).item() == pytest.approx(pixel_kl_divergence(s, t, 4.0).item(), rel=1e-5)


def save_teacher(path: Path, network: str = "slim_unet", width: int = 4, num_classes: int = 2, seed: int = 0) -> Path:
    """A Lightning-style teacher checkpoint: weights under ``net.`` and the architecture in hparams."""
    torch.manual_seed(seed)
    net = build_segmentation_network(network, 3, num_classes, width=width)
    for module in net.modules():  # batch-norm statistics as training leaves them, not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            (
                module.running_mean.uniform_(-0.5, 0.5),
                module.running_var.uniform_(0.5, 2.0),
                module.bias.data.uniform_(-0.5, 0.5),
            )
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {
                "network": network,
                "network_kwargs": {"width": width},
                "in_channels": 3,
                "num_classes": num_classes,
            },
            "network_family": "segmentation",
        },
        path,
    )
    return path


def write_manifest(path: Path, checkpoints: list[Path]) -> Path:
    entries = [
        {"name": f"t{k}", "checkpoint": str(c), "sha256": file_sha256(c), "subset": {}}
        for k, c in enumerate(checkpoints)
    ]
    path.write_text(yaml.safe_dump({"teachers": entries}))
    return path


def test_same_architecture_teachers_run_batched_and_match_one_by_one(tmp_path):
    paths = [save_teacher(tmp_path / f"t{k}.ckpt", seed=k) for k in range(3)]
    paths.append(save_teacher(tmp_path / "unet.ckpt", network="unet", width=8))  # a mixed architecture
    batched, looped = FrozenTeachers(paths, "segmentation", batched=True), FrozenTeachers(paths, "segmentation")
    nhwc = FrozenTeachers(paths, "segmentation", channels_last=True)
    unfolded = FrozenTeachers(paths, "segmentation", fold_batch_norm=False)
    batched.load(), looped.load(), nhwc.load(), unfolded.load()
    assert [len(group[0]) for group in batched._groups()] == [3, 1]  # one vmap-ed pass for the three slim U-Nets
    assert [len(group[0]) for group in looped._groups()] == [1, 1, 1, 1]  # default on CPU: one by one (faster there)
    assert nhwc.networks[0].conv_0.conv_0.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    (out_b, feat_b), (out_l, feat_l) = batched(x, ["down_2"]), looped(x, ["down_2"])
    out_c, feat_c = nhwc(x.contiguous(memory_format=torch.channels_last), ["down_2"])
    out_u, feat_u = unfolded(x, ["down_2"])
    for a, b, c, u in zip(out_b, out_l, out_c, out_u):
        assert torch.allclose(a, u, atol=1e-5) and torch.allclose(b, u, atol=1e-5) and torch.allclose(c, u, atol=1e-5)
    for a, b, c, u in zip(feat_b, feat_l, feat_c, feat_u):
        assert (
            torch.allclose(a[0], u[0], atol=1e-5)
            and torch.allclose(b[0], u[0], atol=1e-5)
            and torch.allclose(c[0], u[0], atol=1e-5)
        )
    for teachers, folded in ((batched, True), (looped, True), (nhwc, True), (unfolded, False)):
        norms = [m for m in teachers.networks.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert (not norms) == folded  # batch norm folded into the convolutions on the first pass
    assert nhwc.networks[0].conv_0.conv_0.conv.weight.is_contiguous(
        memory_format=torch.channels_last
    )  # after folding too
    with pytest.raises(ValueError, match="batch norm was folded in"):
        looped(x, ["conv_0.conv_0.conv"])  # a convolution's own output, no longer what it was
    assert not any(out.requires_grad for out in out_b)
    assert batched.state_dict() == {} and not batched.train().training


def test_monai_unet_teachers_stay_eager_a_graph_would_freeze_their_python_padding(tmp_path):
    teachers = FrozenTeachers([save_teacher(tmp_path / "t0.ckpt")], "segmentation")
    teachers.load()
    teachers(torch.randn(2, 3, 32, 32))  # BasicUNet pads odd sizes in Python: a TracerWarning, so no graph
    assert teachers._graphs[(0, (3, 32, 32), torch.float32)] is teachers.networks[0]


def test_feature_taps_survive_a_deepcopy_of_the_tapped_model():
    import copy

    net = build_segmentation_network("slim_unet", 3, 2, width=4)
    taps = FeatureTaps(net, ["down_2"])
    momentum_copy = copy.deepcopy(net)
    momentum_copy(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="did not run"):  # the copy did not write into the original's taps
        taps.pop()
    x = torch.randn(1, 3, 32, 32)
    net(x)
    assert taps.pop()[0].shape[0] == 1


def multi_args(root: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "experiments/prostate/student_multi_teacher.yaml"),
        *OVERRIDES,
        f"--data.init_args.data_root={root}",
        f"--model.init_args.teachers={manifest}",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]


@pytest.mark.parametrize("rule", ["mean", "confidence", "performance", "learned"])
def test_multi_teacher_student_fits_under_a_trainer_with_every_rule(synthetic_prostate_root, tmp_path, rule):
    manifest = write_manifest(
        tmp_path / "manifest.yaml", [save_teacher(tmp_path / f"t{k}.ckpt", seed=k) for k in range(3)]
    )
    weights = "{dice: 1.0, lovasz: 1.0, kd: 1.0, feature: 10.0" + (", gate: 1.0}" if rule == "learned" else "}")
    main(
        [
            "fit",
            *multi_args(synthetic_prostate_root, manifest, tmp_path / "run"),
            f"--model.init_args.weighting={rule}",
            f"--model.init_args.loss_weights={weights}",
            "--trainer.limit_val_batches=1",
        ]
    )
    log_dir = tmp_path / "run" / "lightning_logs" / "version_0"
    header = (log_dir / "metrics.csv").read_text().splitlines()[0]
    assert {"train/kd", "train/feature", "train/teacher_weight/0", "train/teacher_weight/2"} <= set(header.split(","))
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=True)
    recorded = [record["sha256"] for record in checkpoint["teacher_records"]]
    assert recorded == [file_sha256(tmp_path / f"t{k}.ckpt") for k in range(3)]
    assert checkpoint["hyper_parameters"]["teacher_sha256"] is None  # the user's value, as given
    assert not any(".networks." in k for k in checkpoint["state_dict"])


def test_student_tests_and_predicts_after_its_teachers_are_deleted(synthetic_prostate_root, tmp_path):
    teachers = tmp_path / "teachers"
    teachers.mkdir()
    manifest = write_manifest(
        teachers / "manifest.yaml", [save_teacher(teachers / f"t{k}.ckpt", seed=k) for k in range(2)]
    )
    args = multi_args(synthetic_prostate_root, manifest, tmp_path / "run", "--trainer.limit_val_batches=1")
    main(["fit", *args])
    last = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    shutil.rmtree(teachers)
    main(["test", *args, f"--ckpt_path={last}"])
    main(["predict", *args, f"--ckpt_path={last}"])
    assert list((tmp_path / "run" / "predictions").rglob("*_prediction.nii.gz"))
    with pytest.raises(SystemExit, match="manifest.yaml: teacher manifest not found"):
        main(["fit", *args])


def test_teacher_cache_is_built_once_reused_and_refused_for_other_data(synthetic_prostate_root, tmp_path):
    manifest = write_manifest(
        tmp_path / "manifest.yaml", [save_teacher(tmp_path / f"t{k}.ckpt", seed=k) for k in range(2)]
    )
    cache = tmp_path / "cache.safetensors"
    cached = [
        "--model.init_args.weighting=mean",
        "--model.init_args.loss_weights={dice: 1.0, kd: 1.0}",
        f"--model.init_args.teacher_cache={cache}",
        "--trainer.limit_val_batches=1",
    ]
    with pytest.raises(SystemExit, match="intensity augmentation .* cannot be applied to cached outputs"):
        main(["fit", *multi_args(synthetic_prostate_root, manifest, tmp_path / "a"), *cached])
    cached.append("--data.init_args.intensity_augmentation=false")
    main(["fit", *multi_args(synthetic_prostate_root, manifest, tmp_path / "a"), *cached])
    built = cache.stat().st_mtime_ns
    main(["fit", *multi_args(synthetic_prostate_root, manifest, tmp_path / "b"), *cached])
    assert cache.stat().st_mtime_ns == built  # reused, not rebuilt
    with pytest.raises(SystemExit, match="cache.safetensors: teacher cache was built for other image_size"):
        main(
            [
                "fit",
                *multi_args(synthetic_prostate_root, manifest, tmp_path / "c"),
                *cached,
                "--data.init_args.image_size=48",
            ]
        )
    other = write_manifest(tmp_path / "other.yaml", [save_teacher(tmp_path / "t9.ckpt", seed=9), tmp_path / "t1.ckpt"])
    with pytest.raises(SystemExit, match="teacher cache was built for other teachers"):
        main(["fit", *multi_args(synthetic_prostate_root, other, tmp_path / "d"), *cached])


def test_cached_logits_follow_the_geometric_augmentation(synthetic_prostate_root):
    """A label-derived 'teacher' cache must stay aligned with the label through flips and rotations."""
    from data_modules.prostate import ProstateDataModule

    dm = ProstateDataModule(str(synthetic_prostate_root), image_size=32, num_workers=0, intensity_augmentation=False)
    dm.setup("fit")
    train = dm.train_set
    labels = torch.stack([train.volumes[v].mask[s] for v, s in train.samples]).long()
    one_hot = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float() * 20 - 10  # (N, C, H, W) logits
    dm.attach_teacher_outputs(one_hot[:, None].half())
    agree = [
        (item["teacher_logits"][0].argmax(0) == item["label"]).float().mean() for item in (train[i] for i in range(24))
    ]
    assert torch.stack(agree).mean() > 0.97


def test_bad_multi_teacher_inputs_are_one_line_errors(synthetic_prostate_root, tmp_path):
    good = [save_teacher(tmp_path / f"t{k}.ckpt", seed=k) for k in range(2)]
    missing = write_manifest(tmp_path / "missing.yaml", good)
    (tmp_path / "t1.ckpt").rename(tmp_path / "moved.ckpt")
    with pytest.raises(DataError, match=r"missing.yaml: teacher 't1' checkpoint .*t1.ckpt not found"):
        MultiTeacherDistillModule(teachers=str(missing)).prepare_distillation()
    (tmp_path / "moved.ckpt").rename(tmp_path / "t1.ckpt")
    stale = write_manifest(tmp_path / "stale.yaml", good)
    save_teacher(tmp_path / "t1.ckpt", seed=7)  # retrained after the manifest was written
    with pytest.raises(DataError, match="t1.ckpt: content hash .* differs from the recorded"):
        MultiTeacherDistillModule(teachers=str(stale)).prepare_distillation()
    three_classes = write_manifest(
        tmp_path / "classes.yaml", [good[0], save_teacher(tmp_path / "c3.ckpt", num_classes=3)]
    )
    with pytest.raises(DataError, match="c3.ckpt: teacher predicts 3 classes, the student 2"):
        MultiTeacherDistillModule(
            teachers=str(three_classes), loss_weights={"dice": 1.0, "kd": 1.0}
        ).prepare_distillation()
    with pytest.raises(DataError, match="'gate' term trains the gate of weighting 'learned'"):
        MultiTeacherDistillModule(teachers=str(three_classes), weighting="learned", loss_weights={"kd": 1.0})
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                *multi_args(synthetic_prostate_root, stale, tmp_path / "run"),
                "--model.init_args.weighting=majority",
            ]
        )
    assert "weighting" in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)
    with pytest.raises(DataError, match="spec.yaml: teacher 'HK' has no training cases after the split"):
        teacher_subsets(
            {"partition": "by_site", "sites": ["RUNMC", "HK"]}, ["RUNMC/Case00", "BMC/Case01"], 0, "spec.yaml"
        )


def test_limit_trained_teachers_subsets_are_disjoint_capped_and_seeded():
    keys = [f"{site}/Case{i:02d}" for site in ("RUNMC", "BMC") for i in range(5)]
    by_site = teacher_subsets({"partition": "by_site", "max_cases": 2}, keys, 0, "spec")
    assert list(by_site) == ["RUNMC", "BMC"] and all(
        len(v) == 2 and all(k.startswith(s) for k in v) for s, v in by_site.items()
    )
    parts = teacher_subsets({"partition": "random", "num_teachers": 3}, keys, 0, "spec")
    flat = [k for v in parts.values() for k in v]
    assert sorted(flat) == sorted(keys) and len(set(flat)) == len(keys)  # disjoint, covering
    assert parts == teacher_subsets({"partition": "random", "num_teachers": 3}, keys, 0, "spec")


def test_limit_trained_teachers_and_multi_teacher_table_over_seeds(synthetic_prostate_root, tmp_path, capsys):
    """The procedure-2 table at toy scale: teachers by site -> manifest -> students, 2 seeds, resumable."""
    teachers_spec = tmp_path / "teachers.yaml"
    teachers_spec.write_text(
        yaml.safe_dump(
            {
                "config": str(REPO / "experiments/prostate/teacher.yaml"),
                "partition": "by_site",
                "sites": ["RUNMC", "BMC"],
                "max_cases": 1,
            }
        )
    )
    spec = tmp_path / "table.yaml"
    student = lambda name: str(REPO / f"experiments/prostate/{name}.yaml")  # noqa: E731
    spec.write_text(
        yaml.safe_dump(
            {
                "title": "toy procedure 2",
                "seeds": 2,
                "runs": [
                    {"name": "teachers", "teachers": str(teachers_spec), "train_once": True},
                    {"name": "student (no KD)", "config": student("student_baseline")},
                    {
                        "name": "student + 1 teacher",
                        "config": student("student_kd"),
                        "teacher": "teachers",
                        "teacher_index": 1,
                    },
                    {
                        "name": "student + K (mean)",
                        "config": student("student_multi_teacher"),
                        "teachers": "teachers",
                        "overrides": [
                            "--model.init_args.weighting=mean",
                            "--model.init_args.loss_weights={dice: 1.0, kd: 1.0}",
                        ],
                    },
                ],
                "compare": [
                    {"baseline": "student (no KD)", "candidates": ["student + 1 teacher", "student + K (mean)"]}
                ],
            }
        )
    )
    from distill.tables import run_table

    overrides = [*OVERRIDES, f"--data.init_args.data_root={synthetic_prostate_root}", "--trainer.limit_val_batches=2"]
    results = run_table(spec, tmp_path / "out", overrides)
    assert sorted({(r.name, r.seed) for r in results}) == sorted(
        [("teachers: RUNMC", 0), ("teachers: BMC", 0)]  # train_once: the seed-0 teachers serve every seed
        + [(name, seed) for seed in (0, 1) for name in ["student (no KD)", "student + 1 teacher", "student + K (mean)"]]
    )
    assert not (tmp_path / "out" / "teachers" / "seed_1").exists()
    manifest = yaml.safe_load((tmp_path / "out" / "teachers" / "seed_0" / "manifest.yaml").read_text())
    assert [t["name"] for t in manifest["teachers"]] == ["RUNMC", "BMC"]
    assert all(
        len(t["subset"]["train_cases"]) == 1 and t["subset"]["train_cases"][0].startswith(t["name"])
        for t in manifest["teachers"]
    )
    one_teacher = next(r for r in results if r.name == "student + 1 teacher" and r.seed == 1)
    records = torch.load(one_teacher.best_checkpoint, weights_only=True)["teacher_records"]
    assert records[0]["sha256"] == manifest["teachers"][1]["sha256"]  # teacher index 1
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| student + K (mean) |" in table and " ± " in table and "seeds: 0, 1" in table
    assert "(best of the candidates on validation) vs student (no KD)" in table and "2 paired seeds" in table
    capsys.readouterr()
    run_table(spec, tmp_path / "out", overrides)  # everything finished: nothing trains again
    assert "Epoch" not in capsys.readouterr().err


def test_profile_picks_the_most_accurate_student_under_the_budget(capsys):
    from distill.profile import Profile, choose_under_budget, parse_network_spec

    assert parse_network_spec("slim_unet:width=8,dropout=0.1") == ("slim_unet", {"width": 8, "dropout": 0.1})
    profiles = [
        Profile("small", 1, 0.1, 3.0, 0.70),
        Profile("medium", 2, 0.4, 9.0, 0.80),
        Profile("large", 3, 2.0, 30.0, 0.85),
    ]
    assert choose_under_budget(profiles, 10.0).name == "medium"
    with pytest.raises(DataError, match="no scored student is that fast .*small, 3.0 ms"):
        choose_under_budget(profiles, 1.0)
    main(["profile", "slim_unet:width=4", "mobile_unet", "--size", "32"])
    out = capsys.readouterr().out
    assert "| slim_unet:width=4 | 0.12M |" in out and "| mobile_unet |" in out


def test_few_label_teachers_partition_the_students_labelled_cases(synthetic_prostate_root, tmp_path):
    """With labeled_cases: N, the limit-trained teachers learn from the N cases whose masks the
    student keeps (split among them), not from cases the student sees unlabelled."""
    from distill.lightning_cli import DistillCLI
    from distill.limit_trained import train_limit_trained_teachers

    spec = tmp_path / "teachers.yaml"
    config = str(REPO / "experiments/prostate/teacher.yaml")
    spec.write_text(yaml.safe_dump({"config": config, "partition": "random", "num_teachers": 2}))
    overrides = [
        *OVERRIDES,
        f"--data.init_args.data_root={synthetic_prostate_root}",
        "--data.init_args.labeled_cases=2",
        "--trainer.limit_val_batches=1",
    ]
    student_data = DistillCLI(args=["--config", config, *overrides], run=False).datamodule
    labelled = sorted(case.key for case in student_data.case_splits["train"] if case.labeled)
    assert len(labelled) == 2 and len(student_data.case_splits["train"]) > 2
    train_limit_trained_teachers(spec, tmp_path / "teachers", overrides)
    manifest = yaml.safe_load((tmp_path / "teachers" / "manifest.yaml").read_text())
    subsets = [t["subset"]["train_cases"] for t in manifest["teachers"]]
    assert sorted(key for subset in subsets for key in subset) == labelled
    assert [len(subset) for subset in subsets] == [1, 1]
