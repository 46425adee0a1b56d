"""Backbones by name and pretrained weights from local files (``distill.models.backbones``)."""

import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from distill.errors import DataError
from distill.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PUBLIC_DEFAULT,
    build_backbone,
    build_frame_classifier,
    feature_dim,
    load_pretrained_weights,
    public_model_weights_path,
)


def imagenet_batch(*images) -> torch.Tensor:
    """RGB uint8 arrays -> (B, 3, 224, 224): resize 256 (bicubic), centre crop 224, ImageNet normalisation."""
    transform = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(256, interpolation=torchvision.transforms.InterpolationMode.BICUBIC),
            torchvision.transforms.CenterCrop(224),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return torch.stack([transform(Image.fromarray(image)) for image in images])


def test_public_weights_are_imagenet_trained():
    classifier = build_backbone(PUBLIC_DEFAULT, "public", keep_classifier=True).eval()
    features = build_backbone(PUBLIC_DEFAULT, "public").eval()
    images = imagenet_batch(data.chelsea(), data.coffee())
    with torch.no_grad():
        predicted = classifier(images).argmax(1).tolist()
        pooled = features(images)
        pre_logits = classifier.forward_head(classifier.forward_features(images), pre_logits=True)
    assert 281 <= predicted[0] <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert predicted[1] in (967, 968)  # espresso, cup
    assert features.num_features == 1280
    assert pooled.shape == (2, 1280)
    torch.testing.assert_close(pooled, pre_logits)


@pytest.mark.parametrize(
    ("name", "source", "width"),
    [
        ("mobilenetv3_small_050", "timm", 1024),  # 288 channels pooled, then a 1024-wide pre-logits layer
        ("efficientnet_lite0", "timm", 1280),
        ("resnet18", "torchvision", 512),
    ],
)
def test_feature_width_is_what_the_backbone_outputs(name, source, width):
    classifier = build_frame_classifier(name, 7, source=source).eval()
    with torch.no_grad():
        features, logits = classifier.features(torch.zeros(2, 3, 48, 48)), classifier(torch.zeros(2, 3, 48, 48))
    assert feature_dim(classifier.backbone) == features.shape[1] == width and logits.shape == (2, 7)


def test_torchvision_file_loads_into_timm_and_torchvision_alike(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()  # random init stands in for resnet50-0676ba61.pth
    plain = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), plain)
    wrapped = tmp_path / "wrapped.pt"  # an official MoCo checkpoint: DDP query/key encoders with MLP head
    moco = {f"module.encoder_q.{k}": v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    moco |= {"module.encoder_q.fc.0.weight": torch.zeros(8, 512), "module.encoder_q.fc.2.weight": torch.zeros(4, 8)}
    moco |= {"module.encoder_k.conv1.weight": torch.zeros(1), "module.queue": torch.zeros(4, 2)}
    torch.save({"state_dict": moco}, wrapped)
    safetensors_file = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), safetensors_file)

    images = torch.randn(2, 3, 64, 64)
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = reference.eval()(images)
        for path in (plain, wrapped, safetensors_file):
            for source in ("timm", "torchvision"):
                model = build_backbone("resnet18", path, source=source).eval()
                assert model.num_features == 512
                torch.testing.assert_close(model(images), expected)
        classifier = build_backbone("resnet18", plain, source="torchvision", keep_classifier=True).eval()
        assert classifier(images).shape == (2, 1000)


def test_mismatched_weights_list_the_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(
        DataError, match=r"resnet18\.pth does not match the backbone: keys \d+ missing \(layer"
    ) as error:
        build_backbone("resnet34", path)
    assert "\n" not in str(error.value)
    assert "unexpected" not in str(error.value)  # the resnet18 head is ignored, not reported
    with pytest.raises(DataError, match=r"1 unexpected \(extra\.weight\)"):
        state = timm.create_model("resnet18", num_classes=0).state_dict() | {"extra.weight": torch.zeros(1)}
        torch.save(state, path)
        build_backbone("resnet18", path)
    with pytest.raises(DataError, match=r"1 with wrong shape \(conv1\.weight \(64, 1, 7, 7\) vs \(64, 3, 7, 7\)\)"):
        torch.save(timm.create_model("resnet18", num_classes=0, in_chans=1).state_dict(), path)
        build_backbone("resnet18", path)
    public = public_model_weights_path()
    with pytest.raises(DataError, match="has 245 tensors, the model 309: cannot map"):
        load_pretrained_weights(timm.create_model("efficientnet_b0", num_classes=0), public)
    with pytest.raises(
        DataError,
        match=r"1 tensors differ in shape \(_conv_stem\.weight \(32, 3, 3, 3\) -> conv_stem\.weight \(32, 1, 3, 3\)\)",
    ):
        load_pretrained_weights(timm.create_model(PUBLIC_DEFAULT, num_classes=0, in_chans=1), public)


def test_missing_and_bad_files(tmp_path):
    missing = tmp_path / "nowhere" / "resnet50-0676ba61.pth"
    with pytest.raises(DataError, match=f"weights file {missing} does not exist"):
        build_backbone("resnet18", missing)
    with pytest.raises(DataError, match="expected .pth, .pt, .ckpt, .bin or .safetensors"):
        (tmp_path / "weights.txt").write_text("0")
        build_backbone("resnet18", tmp_path / "weights.txt")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
        build_backbone("resnet18", tmp_path / "bad.safetensors")
    with pytest.raises(DataError, match="backbone 'no_such_net'"):
        build_backbone("no_such_net")
    with pytest.raises(DataError, match="weights 'public' exist only for the timm backbone 'efficientnet_lite0'"):
        build_backbone("resnet18", "public")


class RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it would create the file named by ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": RunsCodeWhenUnpickled(str(marker))}, path)
    with pytest.raises(DataError, match=r"evil\.pth refused: it holds Python objects other than tensors"):
        build_backbone("resnet18", path)
    assert not marker.exists()
