"""The plain-torch OneNIP model: outputs, neighbour mask, frozen backbone, weights loading, loss, maps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import timm
import torch
from conftest import TINY_MODEL_ARGS

from onenip_pl.checkpoint_file import read_checkpoint
from onenip_pl.errors import CheckpointError, ConfigError, DataError
from onenip_pl.models import OneNIP, onenip_loss
from onenip_pl.models.backbone import Backbone

TINY = TINY_MODEL_ARGS
LITE0_CHANNELS = 16 + 24 + 40 + 112
OUTPUT_NAMES = {
    "query_features",
    "reconstruction",
    "rec_map",
    "refiner_logit",
    "refiner_map",
    "anomaly_map",
    "image_score",
}


def images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("image_size", [224, 256, 320])
def test_output_names_and_shapes(image_size):
    torch.manual_seed(0)
    model = OneNIP(image_size=image_size, **TINY).eval()
    grid = image_size // 16
    with torch.no_grad():
        output = model(images(2, image_size), images(2, image_size, seed=1))
    assert set(output) == OUTPUT_NAMES
    assert model.feature_size == grid and model.feature_channels == LITE0_CHANNELS
    assert output["query_features"].shape == output["reconstruction"].shape == (2, LITE0_CHANNELS, grid, grid)
    for name in ("rec_map", "refiner_logit", "refiner_map", "anomaly_map"):
        assert output[name].shape == (2, 1, image_size, image_size), name
    assert output["image_score"].shape == (2,)
    assert all(output[name].dtype == torch.float32 for name in ("rec_map", "refiner_map", "anomaly_map"))


def test_b4_shapes_at_batch_one():
    model = OneNIP(image_size=224).eval()
    with torch.no_grad():
        output = model(images(1, 224), images(1, 224, seed=1))
    assert model.feature_channels == 272 and model.backbone.channels == (24, 32, 56, 160)
    assert output["reconstruction"].shape == (1, 272, 14, 14)
    assert output["anomaly_map"].shape == (1, 1, 224, 224)


def test_precomputed_prompt_features_give_the_same_outputs():
    model = OneNIP(image_size=64, **TINY).eval()
    query, prompt = images(2, 64), images(2, 64, seed=1)
    with torch.no_grad():
        from_images = model(query, prompt)
        from_features = model(query, prompt_features=model.extract_features(prompt))
    for name in OUTPUT_NAMES:
        assert torch.allclose(from_images[name], from_features[name], atol=1e-6), name


def test_prompt_i_serves_queries_i_plus_multiples_of_m():
    model = OneNIP(image_size=64, **TINY).eval()
    query = model.extract_features(images(4, 64))
    prompt = model.extract_features(images(2, 64, seed=1))
    with torch.no_grad():
        together = model.reconstruct(query, prompt)
        for index in range(4):
            alone = model.reconstruct(query[index : index + 1], prompt[index % 2 : index % 2 + 1])
            assert torch.allclose(together[index : index + 1], alone, atol=1e-5), index
    with pytest.raises(ValueError, match="prompts"):
        model.reconstruct(query[:3], prompt)


@pytest.mark.parametrize(("image_size", "window"), [(224, 7), (256, 9), (320, 11)])
def test_neighbour_mask_forbids_exactly_the_window(image_size, window):
    model = OneNIP(image_size=image_size, **TINY)
    grid = image_size // 16
    bias = model.reconstructor.attention_bias
    assert bias.shape == (grid * grid, grid * grid)
    centre = grid // 2
    token = centre * grid + centre
    forbidden = torch.isinf(bias[token]).view(grid, grid)
    half = window // 2
    expected = torch.zeros(grid, grid, dtype=torch.bool)
    expected[centre - half : centre + half + 1, centre - half : centre + half + 1] = True
    assert torch.equal(forbidden, expected)
    assert torch.isinf(bias[token, token]) and bias[token, (centre + half + 1) * grid + centre] == 0
    corner = torch.isinf(bias[0]).view(grid, grid)
    assert corner.sum() == (half + 1) ** 2 and corner[: half + 1, : half + 1].all()


def test_neighbour_mask_leaving_nothing_to_attend_is_refused():
    with pytest.raises(ConfigError, match="neighbor_size"):
        OneNIP(image_size=64, neighbor_size=8, **TINY)


def test_backbone_is_frozen_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model = OneNIP(image_size=64, **TINY)
    model.train()
    assert model.reconstructor.training and model.refiner.training
    assert not any(module.training for module in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    query, prompt = images(2, 64), images(2, 64, seed=1)
    output = model(query, prompt)
    losses = onenip_loss(
        output["reconstruction"], output["query_features"], output["refiner_logit"], torch.zeros(2, 1, 64, 64)
    )
    losses["total"].backward()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "backbone weights or BN statistics changed"
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.reconstructor.parameters())


def test_image_size_must_be_a_multiple_of_16():
    with pytest.raises(ConfigError, match="image_size"):
        OneNIP(image_size=200, **TINY)
    model = OneNIP(image_size=64, **TINY)
    with pytest.raises(DataError, match="64"):
        model.extract_features(images(1, 96))


@pytest.mark.parametrize("name", ["tf_efficientnet_b4", "tf_efficientnet_lite0"])
def test_truncated_backbone_matches_the_full_timm_extractor(name):
    torch.manual_seed(0)
    ours = Backbone(name, official_padding=False)
    full = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3)).eval()
    missing, unexpected = full.load_state_dict(ours.body.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("blocks.5.", "blocks.6.")) for k in missing)
    assert len(ours.body.blocks) == 5
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for mine, theirs in zip(ours(x), full(x), strict=True):
            assert torch.equal(mine, theirs)


def test_official_padding_is_automatic_for_b4_only():
    assert OneNIP(image_size=64).backbone.body.blocks[2][0].conv_dw.padding == (2, 2)
    assert not OneNIP(image_size=64, **TINY).backbone.official_padding


def test_backbone_weights_file_accepts_dropped_layers_and_names_bad_keys(tmp_path):
    source = timm.create_model("tf_efficientnet_lite0")
    torch.nn.init.normal_(source.conv_stem.weight)
    weights = source.state_dict()
    path = tmp_path / "lite0.pth"
    torch.save(weights, path)
    model = OneNIP(image_size=64, backbone_weights=path, **TINY)
    assert torch.equal(model.backbone.body.conv_stem.weight, source.conv_stem.weight)

    torch.save({**weights, "blocks.9.0.conv_pw.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.9\.0\.conv_pw\.weight"):
        OneNIP(image_size=64, backbone_weights=path, **TINY)
    torch.save({k: v for k, v in weights.items() if k != "blocks.1.0.conv_dw.weight"}, path)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.0\.conv_dw\.weight"):
        OneNIP(image_size=64, backbone_weights=path, **TINY)


@dataclass
class _ArbitraryObject:
    value: int


def test_checkpoints_needing_arbitrary_unpickling_are_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {}, "config": _ArbitraryObject(1)}, path)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pth")


def test_loss_on_a_hand_computed_case():
    reconstruction = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1).repeat(2, 1, 1, 1)
    target = torch.zeros(2, 2, 1, 1)
    logits = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), math.log(3.0))])
    masks = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    losses = onenip_loss(reconstruction, target, logits, masks)
    # image 0: p = 0.5, t = 0 -> 1 - 1 / (4 * 0.25 + 1) = 0.5; image 1: p = 0.75, t = 1 -> 1 - 4 / 7.25
    dice = (0.5 + (1 - 4 / 7.25)) / 2
    assert losses["mse"].item() == pytest.approx(2.5)
    assert losses["dice"].item() == pytest.approx(dice)
    assert losses["total"].item() == pytest.approx(2.5 + 0.5 * dice)
    assert onenip_loss(reconstruction, target, logits, masks, dice_weight=2.0)[
        "total"
    ].item() == pytest.approx(2.5 + 2 * dice)


def test_loss_is_float32_under_autocast():
    reconstruction = torch.randn(2, 4, 2, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = torch.nn.functional.linear(reconstruction.flatten(1), torch.eye(16)).view(2, 4, 2, 2)
        losses = onenip_loss(
            projected, torch.zeros(2, 4, 2, 2), torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
        )
    assert projected.dtype == torch.bfloat16
    assert all(value.dtype == torch.float32 for value in losses.values())


def test_fusion_and_image_score_by_hand():
    model = OneNIP(image_size=64, **TINY)
    rec_map = torch.zeros(1, 1, 64, 64)
    rec_map[..., 10:26, 30:46] = 1.0
    refiner_map = torch.zeros(1, 1, 64, 64)
    refiner_map[..., 0, 0] = 1.0
    anomaly_map, score = model.fuse(rec_map, refiner_map)
    assert float(model.fusion_scale) == 1.0 and "fusion_scale" in model.state_dict()
    assert anomaly_map[0, 0, 0, 0] == 0.5 and anomaly_map[0, 0, 12, 40] == 0.5
    assert score.item() == pytest.approx(0.5)
    model.fusion_scale.fill_(4.0)
    anomaly_map, _ = model.fuse(rec_map, refiner_map)
    assert anomaly_map[0, 0, 0, 0] == 2.0
    _, score = model.fuse(torch.zeros(1, 1, 64, 64), refiner_map, fusion_scale=0.5)
    assert score.item() == pytest.approx(0.25 / 256)


def test_anomaly_maps_follow_the_spec():
    model = OneNIP(image_size=64, **TINY).eval()
    query = model.extract_features(images(1, 64))
    reconstruction = torch.zeros_like(query)
    logit = torch.zeros(1, 1, 64, 64)
    maps = model.anomaly_maps(query, reconstruction, logit, fusion_scale=2.0)
    norms = query.square().sum(dim=1, keepdim=True).sqrt()
    assert torch.allclose(
        maps["rec_map"][..., ::21, ::21], norms, atol=1e-5
    )  # align_corners: grid corners kept
    assert torch.equal(maps["refiner_map"], torch.full_like(logit, 0.5))
    assert torch.allclose(maps["anomaly_map"], 0.5 * maps["rec_map"] + 0.5, atol=1e-6)


def test_training_mode_adds_jitter_and_dropout_only_while_training():
    torch.manual_seed(0)
    query_features = torch.randn(2, LITE0_CHANNELS, 4, 4)
    deterministic = OneNIP(image_size=64, dropout=0.0, jitter_prob=0.0, **TINY).train()
    first = deterministic.reconstruct(query_features, query_features)
    assert torch.equal(first, deterministic.reconstruct(query_features, query_features))
    for noisy in (OneNIP(image_size=64, dropout=0.0, **TINY), OneNIP(image_size=64, jitter_prob=0.0, **TINY)):
        noisy.train()
        assert not torch.equal(
            noisy.reconstruct(query_features, query_features),
            noisy.reconstruct(query_features, query_features),
        )
        noisy.eval()
        with torch.no_grad():
            assert torch.equal(
                noisy.reconstruct(query_features, query_features),
                noisy.reconstruct(query_features, query_features),
            )


def test_jitter_scale_follows_the_token_norm():
    model = OneNIP(image_size=64, **TINY)
    tokens = torch.ones(8, 196, LITE0_CHANNELS)
    noise = model.reconstructor.jitter(tokens) - tokens
    expected_std = math.sqrt(LITE0_CHANNELS) / LITE0_CHANNELS * 20.0
    assert noise.std().item() == pytest.approx(expected_std, rel=0.02)
