"""timm's tf_efficientnet_b4 with mapped weights reproduces the authors' efficientnet_pytorch B4 (spec §3).

The authors take the outputs of flat blocks 1, 5, 9 and 21 (strides 2, 4, 8, 16). Their Swish is
x * sigmoid(x), timm's is torch's SiLU: the two round differently in the last bit, which random weights
amplify through 22 blocks. So parity is checked twice: bit for bit against the authors' model with torch's
SiLU swapped in (this isolates mapping and padding), and within 1e-5 of the feature scale against the
unmodified model.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import Tensor, nn

from onenip_pl.errors import CheckpointError, ConfigError
from onenip_pl.models.backbone import (
    EFFICIENTNET_B4_STAGE_DEPTHS,
    EFFICIENTNET_LITE0_STAGE_DEPTHS,
    Backbone,
    efficientnet_pytorch_to_timm,
    lite0_package_weights,
    timm_weights_cached,
)

efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch", reason="the authors' backbone package")

AUTHORS_FEATURE_BLOCKS = (1, 5, 9, 21)
IMAGE_SIZES = (224, 256, 320)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def authors_b4() -> nn.Module:
    """Random B4 whose BatchNorm has random affine parameters and statistics re-estimated on random images."""
    torch.manual_seed(0)
    net = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4")
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.normal_(0.0, 0.1)
                layer.reset_running_stats()
                layer.momentum = None
        net.train()
        net.extract_features(torch.randn(4, 3, 224, 224))
    return net.eval()


@pytest.fixture(scope="module")
def authors_b4_with_torch_silu(authors_b4) -> nn.Module:
    net = copy.deepcopy(authors_b4)
    for layer in net.modules():
        if hasattr(layer, "_swish"):
            layer._swish = nn.SiLU()
    return net


@pytest.fixture(scope="module")
def ours_b4(authors_b4) -> Backbone:
    return Backbone("tf_efficientnet_b4", weights=authors_b4.state_dict())


def authors_features(net: nn.Module, images: Tensor) -> list[Tensor]:
    captured: dict[int, Tensor] = {}
    handles = [
        net._blocks[index].register_forward_hook(
            lambda module, args, out, index=index: captured.update({index: out})
        )
        for index in AUTHORS_FEATURE_BLOCKS
    ]
    try:
        with torch.no_grad():
            net.extract_features(images)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[index] for index in AUTHORS_FEATURE_BLOCKS]


def our_features(backbone: Backbone, images: Tensor) -> list[Tensor]:
    with torch.no_grad():
        return backbone(images)


def max_diffs(ours: list[Tensor], theirs: list[Tensor]) -> list[float]:
    assert [f.shape for f in ours] == [f.shape for f in theirs]
    return [float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True)]


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_mapped_b4_equals_authors_model_bit_for_bit_with_the_same_activation(
    image_size, ours_b4, authors_b4_with_torch_silu
):
    images = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(image_size))
    diffs = max_diffs(our_features(ours_b4, images), authors_features(authors_b4_with_torch_silu, images))
    print(f"\n[backbone {image_size}px, same SiLU] max abs diff per stride 2/4/8/16: {diffs}")
    assert max(diffs) <= 1e-6


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
def test_mapped_b4_matches_unmodified_authors_model(image_size, ours_b4, authors_b4):
    images = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(image_size))
    theirs = authors_features(authors_b4, images)
    diffs = max_diffs(our_features(ours_b4, images), theirs)
    scales = [float(f.abs().max()) for f in theirs]
    print(f"\n[backbone {image_size}px, authors' Swish] max abs diff: {diffs}, feature scale {scales}")
    assert [f.shape[1] for f in theirs] == [24, 32, 56, 160]
    for diff, scale in zip(diffs, scales, strict=True):
        assert diff <= TOLERANCE * scale


def test_without_the_padding_quirk_stride_8_and_16_features_differ(authors_b4, authors_b4_with_torch_silu):
    plain = Backbone("tf_efficientnet_b4", weights=authors_b4.state_dict(), official_padding=False)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    diffs = max_diffs(our_features(plain, images), authors_features(authors_b4_with_torch_silu, images))
    print(f"\n[backbone without quirk] max abs diff per stride 2/4/8/16: {diffs}")
    assert diffs[0] <= 1e-6 and diffs[1] <= 1e-6
    assert diffs[2] > 1e-2 and diffs[3] > 1e-2


def test_mapping_covers_every_b4_key(authors_b4):
    mapped = efficientnet_pytorch_to_timm(authors_b4.state_dict(), EFFICIENTNET_B4_STAGE_DEPTHS)
    assert len(mapped) == len(authors_b4.state_dict()) == 706
    timm.create_model("tf_efficientnet_b4").load_state_dict(mapped, strict=True)


def test_mapping_rejects_other_stage_depths(authors_b4):
    with pytest.raises(CheckpointError, match=r"_blocks\.16\."):
        efficientnet_pytorch_to_timm(authors_b4.state_dict(), EFFICIENTNET_LITE0_STAGE_DEPTHS)


def test_lite0_package_weights_load_strictly_into_timm():
    package = lite0_package_weights()
    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(efficientnet_pytorch_to_timm(package, EFFICIENTNET_LITE0_STAGE_DEPTHS), strict=True)
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, package["_blocks.15._project_conv.weight"])


def test_pretrained_lite0_falls_back_to_the_package_weights():
    if timm_weights_cached("tf_efficientnet_lite0"):
        pytest.skip("timm's own Lite0 weights are cached here, so they are used instead of the package's")
    backbone = Backbone("tf_efficientnet_lite0", pretrained=True)
    package = lite0_package_weights()
    assert torch.equal(backbone.body.conv_stem.weight, package["_conv_stem.weight"])
    assert torch.equal(backbone.body.blocks[4][2].bn3.running_var, package["_blocks.10._bn2.running_var"])


def test_padding_quirk_is_refused_for_other_backbones():
    with pytest.raises(ConfigError, match="official_padding"):
        Backbone("tf_efficientnet_lite0", official_padding=True)
